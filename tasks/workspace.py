"""The run folder (`--out DIR`): where a run keeps its cubes, state, results, maps and products.

The folder is a storage URL (a local path, `file://…` or `s3://bucket/prefix`), and every file of
a run goes through this class and `tasks.storage`, so a whole run folder can live on S3 and Dask
workers on other machines share nothing with the driver but that URL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pivotmap.results import R, StageNotRun
from pivotmap.tasks import storage

if TYPE_CHECKING:
    from pathlib import Path

    from odc.geo.geobox import GeoBox

    from pivotmap.config import RunConfig
    from pivotmap.tasks.grid import Tile


@dataclass(frozen=True)
class Workspace:
    """The output folder of a run (a URL) and the tiles of its region."""

    root: str
    config: RunConfig

    @classmethod
    def open(cls, config: RunConfig, out_dir: str | Path) -> Workspace:
        root = storage.normalise(str(out_dir))
        storage.makedirs(root)
        return cls(root=root, config=config)

    @property
    def is_local(self) -> bool:
        return not storage.is_remote(self.root)

    def url(self, *parts: str) -> str:
        """The URL of a file or folder inside the run folder."""
        return storage.join(self.root, *parts)

    # ------------------------------------------------------------------ where things are
    def obs_url(self, modality: str) -> str:
        return self.url("cube", f"obs_{modality}.zarr")

    @property
    def pivot_url(self) -> str:
        return self.url("cube", "pivot.zarr")

    def map_url(self, tile_id: str) -> str:
        """A tile's predicted classes and confidence (npz), staged for publishing."""
        return self.url("maps", f"{tile_id}.npz")

    def model_url(self, name: str, version: str) -> str:
        """Where predict leaves a model version's weights for its workers."""
        return self.url("models", f"{name}-v{version}")

    @property
    def products_url(self) -> str:
        return self.url("products")

    def report_url(self, name: str) -> str:
        return self.url("reports", name)

    # ------------------------------------------------------------------ region
    def tiles(self) -> list[Tile]:
        """The grid tiles covering the configured region."""
        from pivotmap.tasks.region import region_geometry

        r = self.config.region
        geom = region_geometry(**r.model_dump())  # its keywords are RegionConfig's fields
        return self.config.grid.spec().tiles_for_geometry(geom)

    def extent(self, tiles: list[Tile] | None = None) -> GeoBox:
        """The GeoBox of `tiles` (default: all the region's tiles): the cubes' extent."""
        return self.config.grid.spec().union_geobox(self.tiles() if tiles is None else tiles)

    # ------------------------------------------------------------------ stage markers
    # A finished (stage, tile) is marked with the key of its inputs; it is not redone unless
    # forced or the key changed.
    def _marker_url(self, stage: str, tile_id: str) -> str:
        return self.url("state", stage, f"{tile_id}.json")

    def marker(self, stage: str, tile_id: str) -> dict | None:
        """The marker of a finished tile (its key and info), or None."""
        text = storage.read_text_or_none(self._marker_url(stage, tile_id))
        return json.loads(text) if text is not None else None

    def is_done(self, stage: str, tile_id: str, key: str) -> bool:
        found = self.marker(stage, tile_id)
        return found is not None and found.get("key") == key

    def mark_done(self, stage: str, tile_id: str, key: str, info: dict) -> None:
        payload = json.dumps({"key": key, **info}, sort_keys=True)
        storage.write_text(self._marker_url(stage, tile_id), payload)

    def clear_stage(self, stage: str) -> None:
        storage.remove_tree(self.url("state", stage))

    # ------------------------------------------------------------------ stage results
    def write_result(self, result: R) -> str:
        """Keep a stage's result as reports/<stage>.json; returns its URL."""
        url = self.report_url(f"{result.STAGE}.json")
        storage.write_text(url, result.to_json())
        return url

    def read_result(self, kind: type[R]) -> R:
        """The result of an earlier stage, typed; a clear error naming the stage to run."""
        url = self.report_url(f"{kind.STAGE}.json")
        text = storage.read_text_or_none(url)
        if text is None:
            raise StageNotRun(
                f"{url} is missing: run the '{kind.STAGE}' stage first "
                f"(`pivotmap {kind.STAGE} --config FILE --out {self.root}`, or `pivotmap produce`)"
            )
        return kind.from_json(text)

    def find_result(self, kind: type[R]) -> R | None:
        """The result of a stage if it ran here, else None."""
        try:
            return self.read_result(kind)
        except StageNotRun:
            return None

    # ------------------------------------------------------------------ other files
    def write_report_file(self, name: str, data: bytes | str) -> str:
        """A report file (PNG, HTML, JSON) under reports/; returns its URL."""
        url = self.report_url(name)
        storage.write_bytes(url, data.encode() if isinstance(data, str) else data)
        return url
