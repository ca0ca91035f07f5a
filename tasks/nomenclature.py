"""The class nomenclature: code, name, colour and a one-sentence description per class."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NODATA_CODE = 255  # class COGs reserve 255 for "no map here"


class NomenclatureError(ValueError):
    """The nomenclature file is missing, malformed or inconsistent with the data."""


class LandCoverClass(BaseModel):
    """One class of the map legend."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    code: int = Field(ge=1, le=254, description="Integer code written in the class COG (1..254).")
    name: str = Field(min_length=1, description="Short class name shown in legends.")
    color: str = Field(description="Legend colour as #RRGGBB.")
    description: str = Field(
        min_length=1,
        description="One sentence saying what the class contains (legends, STAC, prompts).",
    )
    descriptions: list[str] = Field(
        default_factory=list,
        description="More plain-language phrasings of the class (text alignment, concept maps).",
    )

    @field_validator("color")
    @classmethod
    def _hex_colour(cls, value: str) -> str:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
            raise ValueError(f"colour {value!r} is not #RRGGBB")
        return value.lower()

    @property
    def phrasings(self) -> list[str]:
        """Every way the class is put in words: its name, its description, then the others."""
        out = [self.name, self.description, *self.descriptions]
        return list(dict.fromkeys(p.strip() for p in out if p.strip()))

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class Nomenclature(BaseModel):
    """The legend of a map; `unknown_codes` in label files mean "no reference here"."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="Name of the nomenclature, e.g. 'WorldCereal LC'.")
    classes: list[LandCoverClass] = Field(
        min_length=2, description="The map classes, in legend order."
    )
    unknown_codes: list[int] = Field(
        default_factory=lambda: [0],
        description="Label codes that mean 'unknown' and are ignored in training.",
    )

    @model_validator(mode="after")
    def _unique_codes(self) -> Nomenclature:
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(f"class codes are not unique: {codes}")
        clash = set(codes) & set(self.unknown_codes)
        if clash:
            raise ValueError(f"codes {sorted(clash)} are both classes and unknown_codes")
        return self

    @property
    def codes(self) -> list[int]:
        return [c.code for c in self.classes]

    def by_code(self, code: int) -> LandCoverClass:
        for cls in self.classes:
            if cls.code == code:
                return cls
        raise NomenclatureError(f"class code {code} is not in nomenclature {self.name!r}")

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table: every class colour, transparent nodata."""
        table = {c.code: (*c.rgb, 255) for c in self.classes}
        table[NODATA_CODE] = (0, 0, 0, 0)
        return table


def load_nomenclature(path: str | Path) -> Nomenclature:
    """Read a nomenclature YAML file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise NomenclatureError(
            f"nomenclature file not found: {path} — set `labels.nomenclature` in the config"
        )
    try:
        raw = yaml.safe_load(path.read_text())
        return Nomenclature.model_validate(raw)
    except (yaml.YAMLError, ValueError) as exc:
        raise NomenclatureError(f"nomenclature {path} is invalid: {exc}") from exc
