"""Run configuration: the flows' pydantic parameter models, loaded from `infra/configs/*.yaml`.

Relative paths in a YAML file are resolved against the file's own folder, so a config copied
next to its catalogue and labels works unchanged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pivotmap.tasks.grid import GridSpec

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_MODEL_URI = re.compile(r"^models:/[^/@\s]+(@[^/@\s]+|/[0-9]+)$")  # as models/registry.py reads
DEFAULT_SCL_MASK = (
    0,
    1,
    3,
    8,
    9,
    10,
)  # no data, saturated, cloud shadow, cloud medium/high, cirrus


class ConfigError(ValueError):
    """The run configuration file is missing or invalid."""


def _resolve(value: str | None, info: ValidationInfo) -> str | None:
    """Bare relative paths are relative to the config file; URLs and absolute paths stay."""
    if value is None or _URL.match(value) or Path(value).is_absolute():
        return value
    base = (info.context or {}).get("base_dir")
    return str((Path(base) / value).resolve()) if base else value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceConfig(_Frozen):
    """Where the Sentinel items come from."""

    kind: Literal["static", "api"] = Field(
        description="'static': a static STAC catalogue (catalog.json path or URL); 'api': a STAC API."
    )
    url: str = Field(description="catalog.json path/URL (static) or STAC API root URL (api).")
    s2_collection: str | None = Field(
        default="sentinel-2-l2a", description="Sentinel-2 L2A collection id; null to skip S2."
    )
    s1_collection: str | None = Field(
        default="sentinel-1-rtc",
        description="Sentinel-1 collection id (RTC or GRD); null to skip S1.",
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="Per-request timeout (STAC APIs, catalogues on http(s))."
    )
    max_retries: int = Field(
        default=3,
        ge=0,
        le=10,
        description="STAC API or http(s) catalogue: retries of a request answered 429/5xx, not "
        "connected or cut short (backoff).",
    )
    backoff_s: float = Field(
        default=0.5, ge=0, description="Retry backoff factor in seconds (doubles per retry)."
    )
    page_size: int | None = Field(
        default=100,
        description="STAC API: items per page (`limit`, 1..10000); null: server default.",
    )
    href_modifier: str | None = Field(
        default=None,
        description="'module:function' applied to each item, e.g. to sign asset URLs; null: none.",
    )
    headers_env: dict[str, str] = Field(
        default_factory=dict,
        description="Request headers whose values are read from environment variables, "
        "{header: VARIABLE}, e.g. {X-API-Key: PIVOTMAP_STAC_KEY}; sent to the STAC API's (or "
        "http(s) catalogue's) host, and with COG reads if `asset_headers`. Never in the config "
        "or the logs.",
    )
    bearer_token_env: str | None = Field(
        default=None,
        description="Environment variable holding a bearer token: sent as "
        "`Authorization: Bearer <token>` like a `headers_env` header; null: none.",
    )
    asset_headers: bool = Field(
        default=True,
        description="Send the request headers with COG reads too (GDAL_HTTP_HEADERS): for "
        "assets behind the same credentials; false if assets are on another host.",
    )
    server_filter: bool = Field(
        default=True,
        description="STAC API: send `ingest.max_cloud_cover` to the server (CQL2 `filter` or the "
        "query extension, whichever its conformance classes offer) and trim items with `fields`; "
        "false, or an API offering neither: filter here.",
    )

    _resolve_url = field_validator("url")(_resolve)

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 10_000:
            raise ValueError(
                f"{value} is outside 1..10000: the STAC API item search `limit` allows at most "
                "10000 items per page (pystac-client refuses more, servers often cap lower) — "
                "use e.g. 100, or null for the server's default"
            )
        return value

    @field_validator("headers_env")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for header, var in value.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", header):
                raise ValueError(f"{header!r} is not an HTTP header name")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
                raise ValueError(
                    f"header {header!r}: the value is not an environment variable name — give the "
                    "variable's name (e.g. PIVOTMAP_STAC_TOKEN), never the secret itself"
                )
        return value

    @field_validator("bearer_token_env")
    @classmethod
    def _token_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(
                "not an environment variable name — give the variable's name "
                "(e.g. PIVOTMAP_STAC_TOKEN), never the token itself"
            )
        return value

    @model_validator(mode="after")
    def _one_modality(self) -> SourceConfig:
        if not self.s2_collection and not self.s1_collection:
            raise ValueError("set at least one of source.s2_collection and source.s1_collection")
        return self


class GridConfig(_Frozen):
    """The tiling grid (DESIGN.md: Grid)."""

    crs: str = Field(default="EPSG:3035", description="Projected CRS of the grid.")
    resolution: float = Field(default=10.0, gt=0, description="Pixel size in CRS units (metres).")
    tile_size: int = Field(default=1024, ge=16, description="Tile edge in pixels.")
    origin_x: float = Field(default=0.0, description="x of the grid origin (tile edges lie on it).")
    origin_y: float = Field(default=0.0, description="y of the grid origin.")
    extent: tuple[float, float, float, float] | None = Field(
        default=None, description="Valid area of the grid (xmin, ymin, xmax, ymax) in its CRS."
    )

    def spec(self) -> GridSpec:
        return GridSpec(**self.model_dump())


class RegionConfig(_Frozen):
    """The area to map: a bounding box, a GeoJSON file, a GeoPackage layer (e.g. a country) or
    a place name (a country or a town, resolved offline by tasks/gazetteer.py)."""

    bbox: tuple[float, float, float, float] | None = Field(
        default=None, description="xmin, ymin, xmax, ymax in `crs`."
    )
    crs: str = Field(default="EPSG:4326", description="CRS of `bbox`.")
    geojson: str | None = Field(
        default=None, description="GeoJSON file with the region outline (EPSG:4326 or its `crs`)."
    )
    geopackage: str | None = Field(
        default=None, description="GeoPackage file whose features, unioned, are the region."
    )
    layer: str | None = Field(
        default=None, description="GeoPackage layer; default: the only (or first) feature layer."
    )
    place: str | None = Field(
        default=None,
        description="A place name resolved offline: a country by its outline ('Belgium') or a "
        "town of 500+ inhabitants as a disc ('Gent'); of namesakes the most populous, unless a "
        "country (ISO code or name) or US state follows a comma ('Gent, BE', 'Paris, TX'). No "
        "provinces, regions, rivers: use bbox, geojson or geopackage for those.",
    )
    place_radius_km: float | None = Field(
        default=None,
        gt=0,
        le=500,
        description="Radius of a town's disc in km; null: from its population (1-25 km).",
    )

    _resolve_geojson = field_validator("geojson", "geopackage")(_resolve)

    @model_validator(mode="after")
    def _exactly_one(self) -> RegionConfig:
        kinds = ("bbox", "geojson", "geopackage", "place")
        given = [k for k in kinds if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of region.bbox, region.geojson, region.geopackage and region.place"
            )
        if self.place is not None and not self.place.strip():
            raise ValueError("region.place is empty: name a country or a town, e.g. 'Gent, BE'")
        if self.place_radius_km is not None and self.place is None:
            raise ValueError("region.place_radius_km is the radius around region.place: set both")
        if self.bbox and not (self.bbox[0] < self.bbox[2] and self.bbox[1] < self.bbox[3]):
            raise ValueError(f"region.bbox {self.bbox} is not (xmin, ymin, xmax, ymax)")
        return self


class PeriodConfig(_Frozen):
    """The time span of the cube and of the map."""

    start: dt.date = Field(description="First day (inclusive).")
    end: dt.date = Field(description="Last day (inclusive).")

    @model_validator(mode="after")
    def _ordered(self) -> PeriodConfig:
        if self.end < self.start:
            raise ValueError(f"period.end {self.end} is before period.start {self.start}")
        return self

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


class IngestConfig(_Frozen):
    """Item selection and masking."""

    max_cloud_cover: float = Field(
        default=100.0, ge=0, le=100, description="Skip S2 items above this eo:cloud_cover."
    )
    scl_mask: tuple[int, ...] = Field(
        default=DEFAULT_SCL_MASK,
        description="SCL classes masked out (default: no data, saturated, shadow, clouds, cirrus; "
        "add 11 to mask snow).",
    )
    s1_orbit_state: Literal["ascending", "descending"] | None = Field(
        default=None, description="Keep only this S1 orbit direction; null keeps both."
    )
    scl_dilation_px: int = Field(
        default=0, ge=0, le=50, description="Grow the SCL mask by this many 10 m pixels."
    )
    s2_without_scl: Literal["error", "skip"] = Field(
        default="error",
        description="An S2 item without SCL: stop with an error naming it, or skip it (reported).",
    )
    s2_harmonisation: Literal["metadata", "baseline"] = Field(
        default="metadata",
        description="S2 offset: 'metadata' = raster:bands where declared, else processing "
        "baseline (>= 04.00: -0.1); 'baseline' = always from the processing baseline.",
    )
    workers: int = Field(
        default=4, ge=1, description="Threads reading COGs when no Dask scheduler is given."
    )
    batch_mb: int = Field(
        default=1024,
        ge=16,
        description="Values one read batch holds (MB of float32, blocks grouped up to it): with "
        "the write of the batch before, it sets ingest's memory (about 1.7× it at most), never "
        "the region; larger batches open each COG fewer times.",
    )
    scheduler_address: str | None = Field(
        default=None,
        description="Address of a running Dask scheduler for tile x date reads; null: local threads.",
    )

    @field_validator("scl_mask")
    @classmethod
    def _scl_classes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [v for v in value if not 0 <= v <= 11]
        if bad:
            raise ValueError(f"ingest.scl_mask {bad} are not SCL classes (0..11)")
        return tuple(sorted(set(value)))


class PivotConfig(_Frozen):
    """Daily gap-filled cube."""

    max_hold_days: int = Field(
        default=30,
        ge=0,
        description="Before the first / after the last observation, hold its value this many days.",
    )
    age_cap_days: int = Field(
        default=366, ge=1, description="Information age is capped at this many days."
    )
    min_valid_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Quality gate: least share of filled values per variable.",
    )
    method: str = Field(
        default="nearest",
        description="Gap-filling method, by registered name (pivotmap.tasks.gapfill.METHODS): "
        "`nearest` (the default: the nearest valid observation, a cube about 1.4x the obs "
        "cubes) or `linear` (linear in time, about 2.6x: portable codecs cannot predict ramps).",
    )
    time_chunk_days: int | None = Field(
        default=None,
        ge=8,
        le=4096,
        description="Days per Zarr chunk along time (a pixel's series within one is contiguous); "
        "default: the days of the first build, so days appended later start a new chunk.",
    )
    zstd_level: int = Field(
        default=3,
        ge=1,
        le=9,
        description="Blosc zstd level of a new pivot cube. 3 writes about 3x faster than 5, whose "
        "cube is about 10 % smaller on real Sentinel-2 (Flanders) and the same on the demo; "
        "writing is most of the pivot's time. A cube keeps the level it was created with (days "
        "appended later use it), so changing it rebuilds nothing.",
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from pivotmap.tasks.gapfill import get_method

        get_method(value)
        return value


class LabelSource(_Frozen):
    """One reference data set: a raster of class codes or a vector file of polygons or points."""

    url: str = Field(
        description="Raster (.tif/.tiff/.vrt: band 1 holds class codes, on any grid, reprojected "
        "nearest) or vector file (.gpkg, .parquet/.geoparquet, .fgb, .geojson/.json, .shp)."
    )
    class_column: str | None = Field(
        default=None, description="Vector: column of integer class codes (required)."
    )
    layer: str | None = Field(
        default=None,
        description="Vector: layer of a multi-layer file (GeoPackage); default the first.",
    )
    year_column: str | None = Field(
        default=None,
        description="Vector: reference year per feature; only features within the years asked "
        "for are used (a null year is always used).",
    )
    weight_column: str | None = Field(
        default=None, description="Vector: sample weight per feature (> 0); default 1."
    )
    group_column: str | None = Field(
        default=None,
        description="Vector: id shared by features that must stay on one side of the split "
        "(e.g. a farm); default each polygon is its own group.",
    )
    buffer_m: float = Field(
        default=0.0,
        ge=0,
        description="Vector: erode polygons by this many metres (grid CRS) before rasterising: "
        "parcel edges are where reference errors sit. A polygon eroded to nothing is dropped.",
    )

    _resolve_url = field_validator("url")(_resolve)

    @model_validator(mode="after")
    def _columns_fit_kind(self) -> LabelSource:
        from pivotmap.tasks.labels import source_kind

        vector_only = ("class_column", "layer", "year_column", "weight_column", "group_column")
        if source_kind(self.url) == "vector":
            if not self.class_column:
                raise ValueError(
                    f"labels source {self.url} is a vector file: set its class_column (the "
                    "column holding the class codes)"
                )
        elif [k for k in vector_only if getattr(self, k)] or self.buffer_m:
            given = [k for k in (*vector_only, "buffer_m") if getattr(self, k)]
            raise ValueError(
                f"labels source {self.url} is a raster (band 1 holds the codes): {given} apply "
                "to vector files only"
            )
        return self


class LabelsConfig(_Frozen):
    """Reference data for training and evaluation: one or several sources on any grid or CRS."""

    url: str | None = Field(
        default=None,
        description="One label raster (GeoTIFF/COG of class codes) on any grid; reprojected "
        "nearest. Vector files and several sources go under `sources`.",
    )
    sources: tuple[LabelSource, ...] = Field(
        default=(),
        description="Label sources (rasters or vector files); where several label a pixel, the "
        "first one listed (after `url`) wins.",
    )
    nomenclature: str = Field(
        description="Nomenclature YAML: code, name, colour, description per class."
    )

    _resolve_paths = field_validator("url", "nomenclature")(_resolve)

    @model_validator(mode="after")
    def _some_source(self) -> LabelsConfig:
        if self.url is None and not self.sources:
            raise ValueError("labels: set `url` or at least one entry of `sources`")
        if self.url is not None:
            from pivotmap.tasks.labels import source_kind

            if source_kind(self.url) == "vector":
                raise ValueError(
                    f"labels.url {self.url} is a vector file: list it under labels.sources "
                    "with its class_column"
                )
        return self

    @property
    def all_sources(self) -> tuple[LabelSource, ...]:
        """`url` first (as a source), then `sources`, in priority order."""
        first = (LabelSource(url=self.url),) if self.url is not None else ()
        return first + self.sources


class TrainConfig(_Frozen):
    """Model training and registration."""

    model_name: str | None = Field(
        default=None, description="Registered model name; default pivotmap-<name>."
    )
    epochs: int = Field(default=40, ge=1, description="Training epochs.")
    batch_size: int = Field(default=256, ge=8, description="Pixels per batch.")
    learning_rate: float = Field(default=2e-3, gt=0, description="AdamW learning rate.")
    hidden: int = Field(default=32, ge=8, description="Width of the temporal encoders.")
    modalities: tuple[Literal["s2", "s1"], ...] = Field(
        default=("s2", "s1"),
        min_length=1,
        description="Modalities the network encodes (fused when both).",
    )
    summary_token: bool = Field(
        default=False,
        description="Each modality also gives the fusion one calendar-free token: the "
        "percentiles, mean and std of its clear observations per band and index, as the "
        "percentile baseline sees them.",
    )
    label_fraction: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Train on this share of the labelled training pixels (few-label runs).",
    )
    pretrain_epochs: int = Field(
        default=20,
        ge=0,
        description="Masked-reconstruction pretraining epochs on unlabelled pixels; 0 = none.",
    )
    pretrain_lr_scale: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Fine-tuning learning rate of the pretrained encoder, relative to the head's "
        "(0.1 helped with few labels on Flanders, 1.0 with all of them).",
    )
    max_unlabelled_pixels: int = Field(
        default=20000,
        ge=2,
        description="Pretrain and distil on at most this many pixels outside held-out blocks.",
    )
    baseline_trees: int = Field(
        default=200,
        ge=0,
        description="Baseline size (forest trees or boosting rounds); 0 = no baseline.",
    )
    baseline_every: int = Field(
        default=2,
        ge=1,
        description="Temporal baseline features every this many network time steps.",
    )
    baseline_features: Literal["percentiles", "temporal"] = Field(
        default="percentiles",
        description="The baseline's features: 'percentiles' (calendar-free: percentiles, mean "
        "and std of each band's and index's clear observations; transfers to other places and "
        "years) or 'temporal' (the gap-filled bands every `baseline_every` steps: date-indexed; "
        "better where the other region grows crop types the training region lacks, "
        "`tests/benchmarks/bench_transfer.py --scenario unseen`).",
    )
    baseline_model: Literal["random_forest", "gradient_boosting"] = Field(
        default="random_forest",
        description="The baseline's trees: a class-balanced random forest of `baseline_trees` "
        "trees, or histogram gradient boosting with `baseline_trees` rounds.",
    )
    augment_shift_days: int = Field(
        default=0,
        ge=0,
        le=120,
        description="Training augmentation: shift each pixel's season by a random number of "
        "days in ±this (the day of year stays), so the network does not learn the calendar; "
        "0 = off (the default: on the transfer benchmark it did not reliably help).",
    )
    augment_stretch: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="Training augmentation: stretch each pixel's season by a random factor in "
        "1 ± this; 0 = off.",
    )
    augment_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Training augmentation: drop this share of each pixel's dates (as if not "
        "observed: value 0, age at the cap); 0 = off.",
    )
    ensemble_members: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Pretrain and train the classifier this many times (seeds seed, seed+1, …) "
        "and register the ensemble: it averages the members' class probabilities, and the "
        "share of members that chose a pixel's class scales its confidence; the members' "
        "spread is reported. Costs that many trainings and forward passes (prediction too). "
        "1 (default) = one network. On the transfer benchmark 3 members halved the seed spread "
        "of the other region's accuracy but moved its mean within noise: not worth 3x the "
        "prediction cost of a national map by default; set 3 where stability matters more.",
    )
    distill_epochs: int = Field(
        default=0, ge=0, description="Distil a smaller student for this many epochs; 0 = none."
    )
    distill_hidden: int = Field(default=16, ge=8, description="Width of the distilled student.")
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="Torch threads when training on CPU; null = the fastest of 1 and all cores, "
        "timed on a few training steps before training (1 often wins on small or shared machines).",
    )
    max_train_pixels: int = Field(
        default=20000,
        ge=100,
        description="Train on at most this many labelled pixels (stratified by class).",
    )
    max_test_pixels: int = Field(
        default=50000,
        ge=100,
        description="Evaluate on at most this many held-out pixels (one rate for every class, "
        "so overall accuracy stays unbiased).",
    )
    include: tuple[str, ...] = Field(
        default=(),
        description="Run folders (paths or s3:// URLs) whose training tables (`pivotmap sample`) "
        "join this run's: one model trained on several regions and years.",
    )

    holdout: str | None = Field(
        default=None,
        description="Validate on a whole run instead of spatial blocks: `self` (this run) or "
        "one of `train.include`. Every labelled pixel of its table is held out (none trains) and "
        "the other tables' training pixels train (their held-out blocks stay unused), so the "
        "scores and the champion gate measure transfer to another region or year.",
    )

    @field_validator("include")
    @classmethod
    def _resolve_include(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return tuple(str(_resolve(v, info)) for v in value)

    @field_validator("holdout")
    @classmethod
    def _resolve_holdout(cls, value: str | None, info: ValidationInfo) -> str | None:
        return value if value in (None, "self") else _resolve(value, info)

    @model_validator(mode="after")
    def _holdout_is_a_gathered_run(self) -> TrainConfig:
        if self.holdout is None:
            return self
        if not self.include:
            raise ValueError(
                "train.holdout needs the tables of several runs: list the others in train.include"
            )
        if self.holdout != "self" and self.holdout not in self.include:
            raise ValueError(
                f"train.holdout {self.holdout!r} is neither `self` nor one of train.include "
                f"{list(self.include)}: name the run folder as train.include does"
            )
        return self

    def holdout_table(self) -> int | None:
        """Which gathered table `holdout` names: 0 = this run's, i = train.include[i - 1]."""
        if self.holdout is None:
            return None
        return 0 if self.holdout == "self" else 1 + self.include.index(self.holdout)

    step_days: int = Field(
        default=5, ge=1, description="Sample the daily cube every this many days."
    )
    block_size: int = Field(default=16, ge=1, description="Spatial split block edge in pixels.")
    test_fraction: float = Field(
        default=0.25, gt=0, lt=1, description="Share of blocks held out for testing."
    )
    seed: int = Field(default=0, description="Seed for the split, the weights and the batches.")


class PredictConfig(_Frozen):
    """Inference."""

    batch_size: int = Field(default=8192, ge=1, description="Pixels per inference batch.")
    model_alias: str = Field(
        default="champion", description="Registry alias resolved for prediction."
    )
    model_uri: str | None = Field(
        default=None,
        description="A registered model to map with, trained in any run: "
        "`models:/<name>@<alias>` or `models:/<name>/<version>`, resolved on the tracking server "
        "of `mlflow.tracking_uri`; no train stage and no labels needed. Null: the run's own model "
        "(`train.model_name`) @ `model_alias`.",
    )
    dask: str = Field(
        default="local",
        description="'local' (a LocalCluster; one worker per GPU with dask-cuda where GPUs exist), "
        "'none' (in this process) or the address of an existing Dask scheduler (tcp://host:8786).",
    )
    workers: int | None = Field(
        default=None, ge=1, description="Local CPU workers (default: cores, at most 4)."
    )
    window: int = Field(
        default=64,
        ge=16,
        description="Tiles are read and classified in windows of this edge (pixels).",
    )
    calendar_shift: Literal["auto"] | int = Field(
        default="auto",
        description="Move every pixel's series this many days (rounded to the model's step) "
        "before classifying. `auto`: the shift that aligns the region's season (mean NDVI per "
        "step of a sample of its cube) with the one the model learnt, within "
        "±`calendar_search_days`; 0 where they already agree, where the season matches poorly "
        "at every shift or where the model keeps no season (the result says why). 0: the "
        "series as they are.",
    )
    calendar_search_days: int = Field(
        default=60, ge=0, le=180, description="`calendar_shift: auto` tries shifts up to this."
    )
    calendar_pixels: int = Field(
        default=4096, ge=100, description="`calendar_shift: auto` estimates on this many pixels."
    )

    @field_validator("model_uri")
    @classmethod
    def _registry_uri(cls, value: str | None) -> str | None:
        if value is not None and not _MODEL_URI.match(value.strip()):
            raise ValueError(
                f"predict.model_uri {value!r} is not models:/<name>@<alias> or "
                "models:/<name>/<version> (e.g. models:/pivotmap-demo@champion)"
            )
        return None if value is None else value.strip()


class PublishConfig(_Frozen):
    """Map products and their STAC catalogue."""

    collection_id: str | None = Field(
        default=None,
        description="STAC collection id; default landcover-<name>-<start year>-<end year>.",
    )
    schema_dir: str | None = Field(
        default=None,
        description="Folder of local STAC JSON schemas (index.json) for offline validation.",
    )
    max_nodata_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Quality gate on map nodata."
    )
    target: str | None = Field(
        default=None,
        description="Where users download products: a folder or s3://bucket/prefix (S3 endpoint and "
        "credentials from the AWS_* environment); default the run folder's products/.",
    )
    validate_stac: Literal["online", "offline", "off"] | None = Field(
        default=None,
        description="Check the STAC against its JSON schemas before publishing: 'online' (fetch "
        "them), 'offline' (from schema_dir) or 'off'; default offline when schema_dir is set, "
        "else online.",
    )
    mosaic_cog: bool = Field(
        default=False, description="Also write the mosaic as one COG (beside the VRT)."
    )
    max_share_change: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Warn when a class share moved more than this since the previous published map.",
    )
    license: str = Field(default="CC-BY-4.0", description="SPDX licence id of the map products.")
    providers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="STAC providers of the products: {name, roles, url, description} each.",
    )
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Public http(s) URL where the products folder is served; gives catalog.json "
        "and each Collection an absolute `self` link (all other links stay relative).",
    )
    stac_api: str | None = Field(
        default=None,
        description="postgresql://USER@HOST:PORT/DB of the pgstac database behind a STAC API "
        "(stac-fastapi-pgstac): publish (and `rollback --stac-api`) loads every kept version, "
        "the current one under the collection id, older ones as `<id>_<version>`; asset hrefs "
        "under `base_url`. The password comes from PGPASSWORD, never from the config.",
    )

    @field_validator("stac_api")
    @classmethod
    def _dsn_without_password(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
            raise ValueError(
                f"{value!r} is not a postgresql://USER@HOST:PORT/DB address of a pgstac database"
            )
        if parts.password:
            raise ValueError(
                "publish.stac_api holds a password: give postgresql://USER@HOST:PORT/DB and set "
                "PGPASSWORD in the environment (a config is copied and logged; a secret is not)"
            )
        return value

    @model_validator(mode="after")
    def _offline_needs_schemas(self) -> PublishConfig:
        if self.validate_stac == "offline" and not self.schema_dir:
            raise ValueError("publish.validate_stac: offline needs publish.schema_dir")
        return self

    @property
    def validation(self) -> str:
        if self.validate_stac:
            return self.validate_stac
        return "offline" if self.schema_dir else "online"

    _resolve_schema = field_validator("schema_dir")(_resolve)


class ConceptConfig(_Frozen):
    """Text alignment of the encoder: concept maps from plain-language prompts (issue 9)."""

    enabled: bool = Field(
        default=True,
        description="Train the text-alignment head after the classifier and save it with the model.",
    )
    steps: int = Field(
        default=100, ge=10, description="Optimisation steps (batches of 128 px) of the head."
    )
    max_pixels: int = Field(
        default=4000, ge=100, description="Align on at most this many training pixels."
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Concept maps made with every run and published as STAC assets of the tiles.",
    )


class ExplainConfig(_Frozen):
    """Integrated-gradients explanations of the map (dominant variable and month per pixel)."""

    enabled: bool = Field(
        default=True, description="Make the explanation layer, plot and saliency in `produce`."
    )
    steps: int = Field(default=32, ge=4, le=512, description="Integrated-gradients path steps.")
    stride: int = Field(
        default=8,
        ge=1,
        le=64,
        description="The explanation layer is computed on every stride-th pixel in x and y and "
        "written at stride × resolution (IG costs `steps` forward+backward passes per pixel).",
    )
    pixels: list[tuple[float, float]] = Field(
        default_factory=list,
        description="Pixels (x, y in the grid CRS) whose full date × variable saliency is "
        "written to reports/saliency.json.",
    )


class DaskConfig(_Frozen):
    """The Dask cluster of the tile stages (ingest, pivot, sample, predict)."""

    address: str | None = Field(
        default=None,
        description="Address of a running Dask scheduler (tcp://host:8786) that every tile stage "
        "runs on (workers share nothing with the driver but the run folder URL, e.g. s3://); "
        "null: each stage's own default (`ingest.scheduler_address`, local threads for pivot and "
        "sample, `predict.dask` for predict).",
    )

    @field_validator("address")
    @classmethod
    def _scheduler_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"dask.address {value!r} is not a scheduler URL (tcp://host:8786)")
        return value


class MlflowConfig(_Frozen):
    """Where runs and models are tracked."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default a SQLite store under the output folder.",
    )


class RunConfig(_Frozen):
    """A whole production run: what to map, where from, and how."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$", description="Short run/region name (lowercase, dashes)."
    )
    description: str = Field(default="", description="What this configuration maps.")
    source: SourceConfig
    grid: GridConfig
    region: RegionConfig
    period: PeriodConfig
    labels: LabelsConfig | None = Field(
        default=None, description="Reference labels (needed to train)."
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    pivot: PivotConfig = Field(default_factory=PivotConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    concept: ConceptConfig = Field(default_factory=ConceptConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)

    @property
    def model_name(self) -> str:
        return self.train.model_name or f"pivotmap-{self.name}"

    @property
    def collection_id(self) -> str:
        if self.publish.collection_id:
            return self.publish.collection_id
        start, end = self.period.start.year, self.period.end.year
        return f"landcover-{self.name}-{start}" + (f"-{end}" if end != start else "")

    def config_hash(self) -> str:
        """Stable hash of the configuration (provenance and cache keys)."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config YAML; errors name the file and the offending keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    raw = deep_merge(raw, overrides or {})
    try:
        return RunConfig.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValueError as exc:
        raise ConfigError(f"config {path} is invalid: {_short(exc)}") from exc


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for err in errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts)
