"""The cube settings a model was trained on: recorded with it, checked before it maps a cube.

A network learns series gap-filled one way (method and its version, hold limit, age cap) from
the variables of its modalities. The same pixels gap-filled another way look different to it and
the map comes out wrong with no error, so a registered model carries these settings (as
`pivotmap.cube.*` tags of its version) and predict compares them with the cube's root attributes
(`tasks/pivot.py:pivot_attrs`) before reading a pixel. Pure functions: no MLflow, no storage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pivotmap.config import PivotConfig
    from pivotmap.models.network import ModelSpec

TAG_PREFIX = "pivotmap.cube."
# Settings that change the values the network reads: they must be equal on the cube mapped.
PIVOT_KEYS = ("pivot.method", "pivot.method_version", "pivot.max_hold_days", "pivot.age_cap_days")
VARIABLES = "cube.variables"


class CubeMismatchError(ValueError):
    """The cube to map was not built the way the model's training cube was."""


def model_variables(spec: ModelSpec) -> tuple[str, ...]:
    """The cube variables the network reads: its modalities' bands and ages."""
    channels = {"s2": spec.s2_channels, "s1": spec.s1_channels}
    return tuple(v for m in ("s2", "s1") if m in spec.modalities for v in channels[m])


def pivot_settings(attrs: Mapping) -> dict[str, str]:
    """The gap-filling settings a pivot cube records in its root attributes ({} for none)."""
    if "max_hold_days" not in attrs:
        return {}
    method = str(attrs.get("gap_filling_method", ""))
    match = re.match(r"^\s*(\S+) v(\S+?):", str(attrs.get("gap_filling", "")))
    version = attrs.get("gap_filling_method_version") or (match.group(2) if match else "")
    return {
        "pivot.method": method or (match.group(1) if match else ""),
        "pivot.method_version": str(version),
        "pivot.max_hold_days": str(int(attrs["max_hold_days"])),
        "pivot.age_cap_days": str(int(attrs["age_cap_days"])),
    }


def config_settings(pivot: PivotConfig) -> dict[str, str]:
    """The same settings from a run config's `pivot` section (when no cube says them)."""
    from pivotmap.tasks.gapfill import get_method

    return {
        "pivot.method": pivot.method,
        "pivot.method_version": str(get_method(pivot.method).version),
        "pivot.max_hold_days": str(pivot.max_hold_days),
        "pivot.age_cap_days": str(pivot.age_cap_days),
    }


def training_settings(pivot: Mapping[str, str], spec: ModelSpec) -> dict[str, str]:
    """What a model records about the cube it learnt from: the pivot settings, the sampling
    step, the modalities and the variables it reads."""
    return {
        **pivot,
        "train.step_days": str(spec.step_days),
        "train.modalities": ",".join(spec.modalities),
        VARIABLES: ",".join(model_variables(spec)),
    }


def as_tags(settings: Mapping[str, str]) -> dict[str, str]:
    return {f"{TAG_PREFIX}{k}": str(v) for k, v in settings.items()}


def from_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The recorded settings of a model version ({} for a model registered before them)."""
    return {k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)}


def check_cube(
    model: str, trained: Mapping[str, str], cube: Mapping[str, str], variables: set[str]
) -> None:
    """Raise CubeMismatchError naming each setting where the cube differs from the model's.

    Args:
        model: the model as a person names it (`pivotmap-demo v2`).
        trained: the model's recorded settings (`from_tags`).
        cube: the cube's settings (`pivot_settings` of its attributes).
        variables: the variables the cube holds.
    """
    differ = [
        (k, trained[k], cube.get(k, "unknown"))
        for k in PIVOT_KEYS
        if trained.get(k) and trained[k] != cube.get(k)
    ]
    if differ:
        first, rest = differ[0], differ[1:]
        text = f"{first[0]}={first[1]}; this cube has {first[2]}"
        text += "".join(f", and {k}={a} where this cube has {b}" for k, a, b in rest)
        raise CubeMismatchError(
            f"model {model} was trained on a cube with {text}: rebuild the pivot with the "
            "model's settings or train a model on this cube"
        )
    wanted = [v for v in trained.get(VARIABLES, "").split(",") if v]
    missing = [v for v in wanted if v not in variables]
    if missing:
        raise CubeMismatchError(
            f"model {model} reads cube variables {', '.join(missing)} that this cube lacks "
            f"(model modalities: {trained.get('train.modalities', '?')}): ingest and pivot "
            "with the model's modalities (source.s2_collection / source.s1_collection) or "
            "train a model on this cube"
        )
