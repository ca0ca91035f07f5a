"""Where a run keeps its cubes, state, models and products under `--out DIR`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from odc.geo.geobox import GeoBox

from pivotmap.config import RunConfig
from pivotmap.tasks.grid import Tile


@dataclass(frozen=True)
class Workspace:
    """The output folder of a run and the tiles of its region."""

    root: Path
    config: RunConfig

    @classmethod
    def open(cls, config: RunConfig, out_dir: str | Path) -> Workspace:
        root = Path(out_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root=root, config=config)

    def obs_url(self, modality: str) -> str:
        return str(self.root / "cube" / f"obs_{modality}.zarr")

    @property
    def pivot_url(self) -> str:
        return str(self.root / "cube" / "pivot.zarr")

    @property
    def maps_dir(self) -> Path:
        return self.root / "maps"

    @property
    def products_dir(self) -> Path:
        return self.root / "products"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    def tiles(self) -> list[Tile]:
        """The grid tiles covering the configured region."""
        from pivotmap.tasks.region import region_geometry

        r = self.config.region
        geom = region_geometry(
            bbox=r.bbox, crs=r.crs, geojson=r.geojson, geopackage=r.geopackage, layer=r.layer
        )
        return self.config.grid.spec().tiles_for_geometry(geom)

    def extent(self, tiles: list[Tile]) -> GeoBox:
        return self.config.grid.spec().union_geobox(tiles)

    # Stage markers: a finished (stage, tile) is not redone unless forced.
    def marker(self, stage: str, tile_id: str) -> Path:
        return self.root / "state" / stage / f"{tile_id}.json"

    def is_done(self, stage: str, tile_id: str, key: str) -> bool:
        path = self.marker(stage, tile_id)
        return path.is_file() and json.loads(path.read_text()).get("key") == key

    def mark_done(self, stage: str, tile_id: str, key: str, info: dict) -> None:
        path = self.marker(stage, tile_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **info}, sort_keys=True))
        tmp.replace(path)

    def clear_stage(self, stage: str) -> None:
        for path in (self.root / "state" / stage).glob("*.json"):
            path.unlink()

    def write_report(self, stage: str, summary: dict) -> Path:
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        path = self.reports_dir / f"{stage}.json"
        path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return path

    def read_report(self, stage: str) -> dict:
        path = self.reports_dir / f"{stage}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: run the '{stage}' stage first (or `pivotmap produce`)"
            )
        return json.loads(path.read_text())
