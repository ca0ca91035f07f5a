"""Concept maps and explanation layers as files and STAC assets (issue 9).

A concept map is one uint8 band of probability in percent (0–100, nodata 255); an explanation
layer has two uint8 bands, the dominant variable and the dominant time window (indices into the
lookups kept in the file's metadata and in the STAC asset). Both are COGs with overviews.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from odc.geo.geobox import GeoBox

from pivotmap.tasks import storage
from pivotmap.tasks.nomenclature import NODATA_CODE

_GDAL_ENV = {"GDAL_PAM_ENABLED": "NO", "GDAL_NUM_THREADS": "1"}


def prompt_slug(prompt: str) -> str:
    """A file- and asset-key-safe name for a prompt ('Open water!' -> 'open-water')."""
    slug = re.sub(r"[^0-9a-z]+", "-", prompt.lower()).strip("-")[:40].strip("-")
    return slug or "concept"


def _block(h: int, w: int) -> int:
    """A COG block edge no larger than half the image where it can be (so overviews exist), and
    never below 128, the smallest GDAL's COG driver accepts (a smaller image is one block)."""
    edge = min(h, w)
    return next((b for b in (512, 256) if b <= edge // 2), 128)


def write_layer_cog(
    path: Path,
    bands: np.ndarray,
    geobox: GeoBox,
    *,
    descriptions: Sequence[str],
    tags: Mapping[str, str],
    resampling: str = "NEAREST",
) -> Path:
    """Write [B, h, w] uint8 (nodata 255) as a COG with overviews, band descriptions and tags."""
    bands = np.asarray(bands)
    if bands.ndim == 2:
        bands = bands[None]
    if bands.dtype != np.uint8 or bands.shape[1:] != (geobox.height, geobox.width):
        raise ValueError(
            f"{path.name}: expected uint8 bands of shape {(geobox.height, geobox.width)}, "
            f"got {bands.dtype} {bands.shape[1:]}"
        )
    block = _block(geobox.height, geobox.width)
    if geobox.crs is None:
        raise ValueError(f"{path.name}: grid has no CRS: a COG needs a georeferenced grid")
    epsg = geobox.crs.epsg
    profile = {
        "driver": "COG", "width": geobox.width, "height": geobox.height, "count": len(bands),
        "dtype": "uint8", "crs": f"EPSG:{epsg}" if epsg else geobox.crs.to_wkt(),
        "transform": geobox.affine, "nodata": NODATA_CODE, "compress": "DEFLATE",
        "blocksize": block, "overview_resampling": resampling,
        "overview_count": max(1, int(math.log2(max(geobox.height, geobox.width) / block))),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with rasterio.Env(**_GDAL_ENV), rasterio.open(tmp, "w", **profile) as dst:
        dst.write(bands)
        for i, text in enumerate(descriptions, start=1):
            dst.set_band_description(i, text)
        dst.update_tags(**dict(tags))
    tmp.replace(path)  # a crash never leaves half a file under the final name
    return path


def save_layer_cog(url: str, bands: np.ndarray, geobox: GeoBox, **options) -> str:
    """`write_layer_cog` to any storage URL: GDAL writes a COG locally, then it is copied."""
    if not storage.is_remote(url):
        return str(write_layer_cog(Path(url), bands, geobox, **options))
    with tempfile.TemporaryDirectory(prefix="pivotmap-layer-") as tmp:
        local = write_layer_cog(Path(tmp, url.rsplit("/", 1)[-1]), bands, geobox, **options)
        storage.copy_file(local, url)
    return url


@dataclass(frozen=True)
class LayerFile:
    """A file published beside a tile's class map, with the fields of its STAC asset."""

    key: str  # asset key, e.g. concept-open-water or explanation
    path: str  # storage URL of the file: a local path or s3://…
    title: str
    description: str
    roles: tuple[str, ...] = ("data",)
    fields: Mapping[str, Any] = field(default_factory=dict)  # pivotmap:prompt, pivotmap:method…

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "path": str(self.path), "title": self.title,
            "description": self.description, "roles": list(self.roles), "fields": dict(self.fields),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LayerFile:
        return cls(
            key=raw["key"], path=raw["path"], title=raw["title"],
            description=raw["description"], roles=tuple(raw["roles"]), fields=raw["fields"],
        )  # fmt: skip


def layer_asset(layer: LayerFile, path: Path, href: str) -> pystac.Asset:
    """The STAC asset of a published layer file (file size and checksum, metadata fields)."""
    from pivotmap.tasks.stac_products import file_asset

    asset = file_asset(path, href, pystac.MediaType.COG, list(layer.roles), layer.title)
    asset.description = layer.description
    asset.extra_fields.update(dict(layer.fields))
    # Every layer is uint8 with nodata 255 (see write_layer_cog); readers such as odc-stac
    # need that on each band, also for layers recorded before the bands said so.
    asset.extra_fields["bands"] = [
        {**band, "data_type": "uint8", "nodata": NODATA_CODE}
        for band in layer.fields.get("bands", [{"name": layer.key}])
    ]
    # A layer's own grid (explanations are coarser than the tile): odc-stac would otherwise
    # assume the Item's grid and load it resampled.
    with rasterio.Env(**_GDAL_ENV), rasterio.open(path) as src:
        asset.extra_fields["proj:shape"] = [src.height, src.width]
        asset.extra_fields["proj:transform"] = [round(v, 8) for v in list(src.transform)[:6]]
    return asset


def concept_layer(url: str, prompt: str, calibration: str, model: Mapping[str, str]) -> LayerFile:
    """The LayerFile of one tile's concept map."""
    return LayerFile(
        key=f"concept-{prompt_slug(prompt)}",
        path=str(url),
        title=f"Concept probability (%): {prompt}",
        description=f"Probability (0-100 %, 255 = no data) that a pixel shows '{prompt}', from "
        "the text-aligned encoder; see pivotmap:method.",
        fields={
            "pivotmap:prompt": prompt,
            "pivotmap:method": calibration,
            "pivotmap:model_name": model["name"],
            "pivotmap:model_version": str(model["version"]),
            "bands": [
                {
                    "name": "probability",
                    "description": "percent 0-100, 255 = no data",
                    "data_type": "uint8",
                    "nodata": NODATA_CODE,
                    "unit": "%",
                }
            ],
        },
    )


def explanation_layer(
    url: str,
    method: str,
    variables: Sequence[str],
    windows: Sequence[str],
    stride: int,
    model: Mapping[str, str],
) -> LayerFile:
    """The LayerFile of one tile's explanation layer, with its value lookups."""
    return LayerFile(
        key="explanation",
        path=str(url),
        title="Explanation: dominant variable and month",
        description=f"Per {stride}x{stride}-pixel cell, the input variable (band 1) and the "
        "month (band 2) with the largest integrated-gradients attribution magnitude for the "
        "predicted class; values index pivotmap:variables and pivotmap:windows, 255 = no data.",
        roles=("data", "metadata"),
        fields={
            "pivotmap:method": method,
            "pivotmap:model_name": model["name"],
            "pivotmap:model_version": str(model["version"]),
            "pivotmap:variables": list(variables),
            "pivotmap:windows": list(windows),
            "bands": [
                {
                    "name": "dominant_variable",
                    "description": "index into pivotmap:variables",
                    "data_type": "uint8",
                    "nodata": NODATA_CODE,
                },
                {
                    "name": "dominant_window",
                    "description": "index into pivotmap:windows",
                    "data_type": "uint8",
                    "nodata": NODATA_CODE,
                },
            ],
        },
    )
