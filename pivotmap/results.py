"""What each stage returns: frozen, typed results with a JSON round-trip.

A stage's result is written to `reports/<stage>.json` in the run folder (through the
workspace) and read back by later stages *through its type* (`Workspace.read_result`), so a
stage never digs in another stage's JSON by string keys. `produce` hands the results on; the CLI
summary, the run report and the Prefect artifacts all render from them.

Nested per-tile rows, quality-suite outcomes and score tables stay plain JSON mappings: they are
shown, not computed on.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

Row = dict[str, Any]


class StageNotRun(FileNotFoundError):
    """A stage needs the result of an earlier stage that has not run in this run folder."""


class StageResult(BaseModel):
    """Base of every stage result: frozen, no unknown keys, JSON in and out."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    STAGE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The result as the JSON object the CLI prints and `reports/<stage>.json` keeps."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        return cls.model_validate_json(text)


R = TypeVar("R", bound=StageResult)


class ModelRef(BaseModel):
    """A registered model version, as MLflow names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    version: str
    run_id: str
    uri: str


# ---------------------------------------------------------------------------- ingest


class ModalityIngest(BaseModel):
    """One modality's ingest: items found, used and skipped (with reasons), tiles written."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    collection: str
    items_found: int
    items_used: int
    item_ids: list[str]
    skipped_items: list[Row]
    dates: int
    tiles_written: list[Row]
    tiles_already_done: list[str]
    cache_key: str
    cube: str
    orbit_states: dict[str, int] | None = None
    tiles_without_data: list[Row] = []
    search: Row | None = None  # how the items were searched (stac_source.Found.info)


class IngestResult(StageResult):
    STAGE: ClassVar[str] = "ingest"
    stage: Literal["ingest"] = "ingest"
    tiles: list[str]
    modalities: dict[str, ModalityIngest]
    duration_s: float


# ---------------------------------------------------------------------------- pivot


class PivotResult(StageResult):
    STAGE: ClassVar[str] = "pivot"
    stage: Literal["pivot"] = "pivot"
    cube: str
    cube_version: str
    mode: str
    reason: str
    tiles_written: list[Row]
    tiles_already_done: list[str]
    quality: Row
    duration_s: float


# ---------------------------------------------------------------------------- train


class SampleResult(StageResult):
    """The training table drawn from the labels and the pivot cube (one Parquet file per tile)."""

    STAGE: ClassVar[str] = "sample"
    stage: Literal["sample"] = "sample"
    table: str
    files: list[str]
    key: str
    cube_version: str
    n_groups: int
    n_test_groups: int
    rows: dict[str, int]
    classes: list[int]
    tiles_written: list[Row]
    tiles_already_done: list[str]
    duration_s: float
    # how the cube was gap-filled (tables gathered by `train.include` must agree)
    pivot_settings: dict[str, str | int] = {}


class TrainResult(StageResult):
    STAGE: ClassVar[str] = "train"
    stage: Literal["train"] = "train"
    overall_accuracy: float
    macro_f1: float
    kappa: float
    per_class_f1: dict[str, float]
    n_test_pixels: int
    confusion_matrix: list[list[int]]
    classes: list[int]
    baseline: Row | None
    student: Row | None
    pretraining: Row | None
    n_train_pixels: int
    label_fraction: float
    split: str
    model_name: str
    model_version: str
    run_id: str
    model_uri: str
    promoted: bool
    promotion_reason: str
    champion_version: str | None
    validation_key: str
    parameters: int
    flops_per_pixel: float
    n_steps: int
    cube_url: str
    cube_version: str
    code_version: str
    device: str
    final_loss: float
    text_alignment: Row | None = None
    ensemble: Row | None = None  # `train.ensemble_members` > 1: the members' spread, agreement
    duration_s: float = 0.0


# ---------------------------------------------------------------------------- predict


class PredictResult(StageResult):
    STAGE: ClassVar[str] = "predict"
    stage: Literal["predict"] = "predict"
    model: ModelRef
    device: str
    tiles: list[Row]
    tiles_already_done: list[str]
    cache_key: str
    pixels: int
    px_per_s: float
    duration_s: float
    peak_rss_mb_per_worker: float
    calendar_shift: Row = {}  # `models.calendar.CalendarShift.summary()`


# ---------------------------------------------------------------------------- concept, explain


class ConceptResult(StageResult):
    STAGE: ClassVar[str] = "concept"
    stage: Literal["concept"] = "concept"
    prompts: list[str] = []
    model: ModelRef | None = None
    layers: dict[str, list[Row]] = {}
    zero_shot: Row | None = None
    skipped: str | None = None
    duration_s: float = 0.0
    known_text_similarity: dict[str, float] = {}  # per prompt: best cosine to the fitted texts
    warnings: dict[str, str] = {}  # per prompt that matches nothing the model knows
    groundings: dict[str, Row] = {}  # per prompt: the descriptor facts it was read as (issue 19)


class ExplainResult(StageResult):
    STAGE: ClassVar[str] = "explain"
    stage: Literal["explain"] = "explain"
    method: str
    model: ModelRef
    stride: int
    variables: list[str]
    windows: list[str]
    layers: dict[str, list[Row]]
    plot: str
    saliency: str
    pixels_explained: int
    dominant_variable_per_class: dict[str, str]
    dominant_month_per_class: dict[str, str]
    completeness_gap_max: float
    duration_s: float


# ---------------------------------------------------------------------------- publish


class PublishResult(StageResult):
    STAGE: ClassVar[str] = "publish"
    stage: Literal["publish"] = "publish"
    published: bool
    quality: Row
    version: str | None = None
    collection: str | None = None
    catalog: str | None = None
    tiles_published: int = 0
    files: int = 0
    bytes: int = 0
    class_areas: Row | None = None
    already_published: bool = False
    validated: str | None = None
    mirror: Row | None = None
    stac_api: dict[str, int] | None = None  # items per collection loaded into pgstac
    duration_s: float = 0.0


# ---------------------------------------------------------------------------- produce


class ProduceResult(StageResult):
    """The run summary a user or a script reads after `produce`: where everything is, how good."""

    STAGE: ClassVar[str] = "produce"
    ok: bool = True
    config: str
    config_hash: str
    period: str
    tiles: int
    items_used: dict[str, int]
    items_skipped: dict[str, int]
    cube: str
    cube_version: str
    map: str
    quicklook: str
    stac_catalog: str
    product_version: str
    mlflow: dict[str, str]
    duration_s: float
    overall_accuracy: float | None = None
    macro_f1: float | None = None
    kappa: float | None = None
    per_class_f1: dict[str, float] | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    zero_shot: Row | None = None
    concept_maps: list[str] | str | None = None
    explanations: Row | None = None

    def to_dict(self) -> dict[str, Any]:
        """The summary's keys as before: parts the run did not make (training, insight) absent."""
        return {k: v for k, v in super().to_dict().items() if v is not None}


STAGE_RESULTS: dict[str, type[StageResult]] = {
    cls.STAGE: cls
    for cls in (
        IngestResult,
        PivotResult,
        SampleResult,
        TrainResult,
        PredictResult,
        ConceptResult,
        ExplainResult,
        PublishResult,
    )
}
