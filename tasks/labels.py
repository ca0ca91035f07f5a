"""Reference labels rasterised onto the grid, checked against the nomenclature."""

from __future__ import annotations

import numpy as np
import rasterio
from odc.geo.geobox import GeoBox
from rasterio.warp import Resampling, reproject

from pivotmap.tasks.nomenclature import Nomenclature, NomenclatureError

UNKNOWN = 0  # internal code for "no reference here"


class LabelError(ValueError):
    """The label file cannot be read or holds codes the nomenclature does not know."""


def read_labels(url: str, geobox: GeoBox, nomenclature: Nomenclature) -> np.ndarray:
    """Class codes on `geobox` (nearest neighbour); unknown codes become 0."""
    try:
        with rasterio.open(url) as src:
            if src.crs is None:
                raise LabelError(
                    f"label raster {url} has no CRS: assign one (e.g. gdal_edit.py -a_srs)"
                )
            out = np.zeros(geobox.shape, dtype=np.int32)
            reproject(
                source=rasterio.band(src, 1),
                destination=out,
                dst_transform=geobox.transform,
                dst_crs=str(geobox.crs),
                dst_nodata=UNKNOWN,
                resampling=Resampling.nearest,
            )
    except rasterio.RasterioIOError as exc:
        raise LabelError(f"cannot read label raster {url}: {exc}") from exc
    check_codes(out, nomenclature, url)
    out[np.isin(out, nomenclature.unknown_codes)] = UNKNOWN
    return out.astype(np.uint8)


def check_codes(labels: np.ndarray, nomenclature: Nomenclature, url: str) -> None:
    """Every code in the labels is a class or an unknown code, else a clear error."""
    present = set(np.unique(labels).tolist()) - {UNKNOWN}
    unknown = sorted(present - set(nomenclature.codes) - set(nomenclature.unknown_codes))
    if unknown:
        raise NomenclatureError(
            f"label file {url} has class codes {unknown} that are not in nomenclature "
            f"{nomenclature.name!r} (codes {nomenclature.codes}): add them or recode the labels"
        )
