"""Seeded synthetic demo region: a static STAC catalogue of fake Sentinel-1/2 COGs plus labels.

Everything written here is SYNTHETIC (made by pivotmap from a seed, not real Sentinel data). The
layout copies the real sample in `shared/realdata/flanders-31UDS-2018` (Earth Search v1 items for
`sentinel-2-l2a`, Planetary Computer items for `sentinel-1-rtc`), so the ingest code that reads the
demo reads real catalogues unchanged. Content is built to be learnable: parcels of six classes with
class-specific phenology in ten S2 bands and in S1 VV/VH, plus clouds, cirrus and shadows in S2.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pystac
import rasterio
import yaml
from affine import Affine
from rasterio.warp import transform as warp_transform

from pivotmap.tasks.grid import GridSpec

CRS = "EPSG:32631"
EPSG = 32631
RESOLUTION = 10.0
ORIGIN = (500000.0, 5630000.0)  # lower-left corner of the region, on the km grid of UTM 31N
MGRS_TILE = "31UDS"  # the MGRS square that holds the origin (as the real Flanders sample)
S2_TIME = time(10, 56, 51)  # Sentinel-2 relative orbit 51 crosses Flanders at about 10:56 UTC


class S1Track(NamedTuple):
    """One Sentinel-1 relative orbit over the region: its crossing time and how its incidence
    angle offsets the backscatter (dB); the tracks of a region alternate date by date."""

    orbit: int
    clock: time
    incidence_db: float
    state: str = "ascending"


S1_TRACKS = (S1Track(161, time(17, 40, 44), -0.4), S1Track(59, time(17, 32, 17), 0.4))
S2_STEP_DAYS = 5
S1_STEP_DAYS = 6
PARCEL_CELL_PX = 16  # one Voronoi seed per 16x16 px cell: parcels of ~2.5 ha, 64 in the default
OVERVIEW_MIN_PX = 256  # rasters larger than this get internal overviews
SHADOW_MARGIN_PX = 48  # clouds outside the region up to this far can cast shadows into it
COG_MEDIA_TYPE = pystac.MediaType.COG
LICENSE = "CC0-1.0"
STAC_VERSION = "1.0.0"  # as the real sample and the public APIs it imitates
SYNTHETIC_KEY = "pivotmap:synthetic"
README_MARKER = "# pivotmap demo region"  # first line of every demo README
OUTPUT_NAMES = ("README.md", "catalog.json", "sentinel-2-l2a", "sentinel-1-rtc", "labels")
SCL_CLOUDY = (3, 8, 9, 10)  # shadow, medium / high cloud probability, thin cirrus
SCL_NAMES = (
    "nodata", "saturated_defective", "dark_features", "cloud_shadow", "vegetation",
    "not_vegetated", "water", "unclassified", "medium_proba_clouds", "high_proba_clouds",
    "thin_cirrus", "snow_ice",
)  # fmt: skip


class _Band(NamedTuple):
    key: str
    file: str
    description: str
    common_name: str
    center: float
    fwhm: float
    gsd: int


S2_BANDS = (
    _Band("blue", "B02", "Blue (band 2)", "blue", 0.49, 0.098, 10),
    _Band("green", "B03", "Green (band 3)", "green", 0.56, 0.045, 10),
    _Band("red", "B04", "Red (band 4)", "red", 0.665, 0.038, 10),
    _Band("rededge1", "B05", "Red edge 1 (band 5)", "rededge", 0.704, 0.019, 20),
    _Band("rededge2", "B06", "Red edge 2 (band 6)", "rededge", 0.74, 0.018, 20),
    _Band("rededge3", "B07", "Red edge 3 (band 7)", "rededge", 0.783, 0.028, 20),
    _Band("nir", "B08", "NIR 1 (band 8)", "nir", 0.842, 0.145, 10),
    _Band("nir08", "B8A", "NIR 2 (band 8A)", "nir08", 0.865, 0.033, 20),
    _Band("swir16", "B11", "SWIR 1 (band 11)", "swir16", 1.61, 0.143, 20),
    _Band("swir22", "B12", "SWIR 2 (band 12)", "swir22", 2.19, 0.242, 20),
)
S2_ASSET_KEYS = tuple(b.key for b in S2_BANDS) + ("scl",)
S1_ASSET_KEYS = ("vv", "vh")
_RED, _NIR08 = 2, 7  # band indices used by the scene classification

# Reflectance spectra in the S2_BANDS order (blue ... swir22), typical published values.
_SOIL = (0.07, 0.10, 0.14, 0.17, 0.18, 0.19, 0.20, 0.21, 0.30, 0.26)
_DRY_GRASS = (0.06, 0.09, 0.11, 0.15, 0.19, 0.22, 0.25, 0.26, 0.32, 0.24)
_LITTER = (0.04, 0.06, 0.07, 0.10, 0.13, 0.15, 0.17, 0.18, 0.22, 0.15)
_URBAN = (0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.17, 0.26, 0.24)
_WATER = (0.05, 0.06, 0.04, 0.03, 0.02, 0.017, 0.014, 0.012, 0.006, 0.004)
_CROP = (0.03, 0.07, 0.035, 0.11, 0.30, 0.38, 0.42, 0.43, 0.21, 0.10)
_GRASS = (0.035, 0.08, 0.04, 0.12, 0.28, 0.35, 0.38, 0.39, 0.22, 0.11)
_FOREST = (0.02, 0.045, 0.022, 0.07, 0.22, 0.29, 0.32, 0.33, 0.15, 0.065)
_CLOUD = (0.55, 0.53, 0.52, 0.52, 0.53, 0.53, 0.54, 0.54, 0.40, 0.28)
_CIRRUS = (1.0, 1.0, 0.95, 0.9, 0.9, 0.85, 0.85, 0.85, 0.55, 0.35)  # relative to the cirrus depth


@dataclass(frozen=True)
class _ClassModel:
    """How one land-cover class looks to S2 and S1 through the year."""

    code: int
    name: str
    color: str
    description: str
    background: tuple[float, ...]  # spectrum without green canopy (soil, stubble, litter, roofs)
    canopy: tuple[float, ...]  # spectrum of full green canopy
    green: tuple[tuple[int, float], ...]  # (day of year, green fraction) knots, cyclic over 365
    vv_db: tuple[float, float]  # (bare, full canopy) backscatter
    vh_db: tuple[float, float]
    moisture: float = 1.0  # weight of the per-date soil-moisture anomaly on bare-soil backscatter
    wind: float = 0.0  # weight of the per-date wind roughening (open water only)
    mowing: bool = False


CLASSES = (
    _ClassModel(
        1, "Winter cereals", "#e6c229",
        "Wheat, barley and other cereals sown in autumn, "
        "green from March to June and harvested in July.",
        _SOIL, _CROP,
        ((0, 0.25), (60, 0.3), (90, 0.45), (120, 0.8), (145, 0.92), (170, 0.85), (190, 0.5),
         (200, 0.05), (285, 0.05), (320, 0.15), (365, 0.25)),
        (-10.5, -12.5), (-19.0, -15.0),
    ),
    _ClassModel(
        2, "Maize", "#f08a24",
        "Maize sown in spring, bare until late May, "
        "green from June to September and harvested in October.",
        _SOIL, _CROP,
        ((0, 0.05), (140, 0.05), (160, 0.1), (180, 0.35), (200, 0.75), (220, 0.92), (245, 0.85),
         (265, 0.6), (280, 0.4), (286, 0.05), (365, 0.05)),
        (-10.5, -8.0), (-20.0, -13.0),
    ),
    _ClassModel(
        3, "Grassland", "#8fd16b",
        "Permanent or temporary grassland, green most of "
        "the year with short dips after each mowing.",
        _DRY_GRASS, _GRASS,
        ((0, 0.6), (60, 0.62), (100, 0.8), (150, 0.9), (240, 0.85), (300, 0.8), (365, 0.6)),
        (-11.0, -9.5), (-18.0, -15.0), mowing=True,
    ),
    _ClassModel(
        4, "Broadleaf forest", "#1f7a33",
        "Deciduous broadleaf woodland, leaf-on from late April to October and leafless in winter.",
        _LITTER, _FOREST,
        ((0, 0.15), (95, 0.15), (115, 0.5), (135, 0.92), (260, 0.92), (290, 0.7), (310, 0.3),
         (325, 0.15), (365, 0.15)),
        (-8.5, -7.5), (-14.0, -12.5), moisture=0.3,
    ),
    _ClassModel(
        5, "Built-up", "#d62728",
        "Buildings, roads and sealed surfaces: low NDVI, "
        "high SWIR and bright, stable radar backscatter.",
        _URBAN, _GRASS,
        ((0, 0.12), (365, 0.12)),
        (1.0, 1.0), (-6.0, -6.0), moisture=0.0,
    ),
    _ClassModel(
        6, "Water", "#1f77b4",
        "Open inland water: very low NIR and SWIR reflectance and very low radar backscatter.",
        _WATER, _WATER,
        ((0, 0.0), (365, 0.0)),
        (-22.0, -22.0), (-28.0, -28.0), moisture=0.0, wind=1.0,
    ),
)  # fmt: skip
_CLASS_WEIGHTS = (0.24, 0.18, 0.26, 0.12, 0.10, 0.10)  # share of parcels beyond one of each class


@dataclass(frozen=True)
class _SubType:
    """Another kind of parcel inside a class (same label): its own phenology."""

    name: str
    green: tuple[tuple[int, float], ...]
    mowing: bool


# The second sub-type of a class; `subtype_shares` says which share of its parcels have it.
SUBTYPES = {
    1: _SubType(
        "Spring cereals (sown in March, green from April to July, harvested in August)",
        ((0, 0.05), (75, 0.05), (100, 0.2), (130, 0.6), (160, 0.9), (185, 0.85), (205, 0.5),
         (220, 0.05), (365, 0.05)),
        mowing=False,
    ),
    2: _SubType(
        "Late-sown maize (green from July, harvested in late September)",
        ((0, 0.05), (165, 0.05), (185, 0.1), (205, 0.4), (225, 0.8), (245, 0.9), (262, 0.7),
         (272, 0.4), (278, 0.05), (365, 0.05)),
        mowing=False,
    ),
    3: _SubType(
        "Grazed pasture (never mown, a lower and steadier green cover)",
        ((0, 0.5), (90, 0.58), (140, 0.72), (240, 0.68), (300, 0.62), (365, 0.5)),
        mowing=False,
    ),
}  # fmt: skip
_DROUGHT_SENSITIVITY = (1.0, 1.0, 1.0, 0.2, 0.0, 0.0)  # per class: crops and grass dry out
DROUGHT_DEPTH = 0.55  # green cover lost at the height of a full drought (drought=1)
DROUGHT_PEAK_DOY, DROUGHT_WIDTH_DAYS = 200, 45  # a summer drought: most severe in mid-July
SEASON_CENTRE_DOY = 182  # `phenology_stretch` lengthens or shortens the season around it


@dataclass(frozen=True)
class Conditions:
    """How a region and year differ from the demo's: the calendar of the vegetation, a
    drought, the mix of classes and sub-types, the cloud regime and the S1 orbits.

    The defaults are the demo's own (same bytes as before these options existed)."""

    phenology_shift_days: float = 0.0  # the whole season later (+) or earlier (-)
    phenology_stretch: float = 1.0  # > 1: a longer season (around SEASON_CENTRE_DOY)
    parcel_jitter_days: float = 7.0  # std of each parcel's own delay (sowing date, variety)
    drought: float = 0.0  # 0..1: summer loss of green cover of crops and grass
    class_weights: tuple[float, ...] = _CLASS_WEIGHTS  # share of each class among parcels
    subtype_shares: tuple[tuple[int, float], ...] = ()  # (class code, share of SUBTYPES[code])
    clear_probability: float = 0.45  # share of cloud-free acquisitions
    overcast_probability: float = 0.12  # share of fully overcast acquisitions
    s1_tracks: tuple[S1Track, ...] = S1_TRACKS

    def __post_init__(self) -> None:
        checks = {
            "phenology_stretch": 0.5 <= self.phenology_stretch <= 2.0,
            "parcel_jitter_days": 0 <= self.parcel_jitter_days <= 60,
            "drought": 0 <= self.drought <= 1,
            "class_weights": len(self.class_weights) == len(CLASSES)
            and min(self.class_weights) >= 0
            and sum(self.class_weights) > 0,
            "subtype_shares": all(
                code in SUBTYPES and 0 <= share <= 1 for code, share in self.subtype_shares
            ),
            "clear_probability + overcast_probability": 0 <= self.clear_probability
            and 0 <= self.overcast_probability
            and self.clear_probability + self.overcast_probability <= 1,
            "s1_tracks": len(self.s1_tracks) >= 1
            and all(t.state in ("ascending", "descending") for t in self.s1_tracks),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"generate_demo_region: {', '.join(bad)} out of range ({self}); see Conditions: "
                "stretch 0.5..2, jitter 0..60 days, drought 0..1, one non-negative weight per "
                f"class, sub-type shares 0..1 for classes {sorted(SUBTYPES)}, cloud "
                "probabilities summing to at most 1, at least one S1 track (ascending or "
                "descending)"
            )

    @property
    def weights(self) -> tuple[float, ...]:
        """Class weights as probabilities."""
        if self.class_weights == _CLASS_WEIGHTS:
            return _CLASS_WEIGHTS  # the demo's draws, bit for bit
        total = sum(self.class_weights)
        return tuple(w / total for w in self.class_weights)

    def season_day(self, doy: int) -> float:
        """The day of the class curves that calendar day `doy` of this year shows."""
        if self.phenology_shift_days == 0 and self.phenology_stretch == 1:
            return doy
        centre = SEASON_CENTRE_DOY + self.phenology_shift_days
        return SEASON_CENTRE_DOY + (doy - centre) / self.phenology_stretch

    def drought_loss(self, doy: int) -> float:
        """Share of green cover a fully sensitive class loses on day `doy`."""
        if not self.drought:
            return 0.0
        z = (doy - DROUGHT_PEAK_DOY) / DROUGHT_WIDTH_DAYS
        return self.drought * DROUGHT_DEPTH * math.exp(-(z**2))


@dataclass(frozen=True)
class DemoRegion:
    """Where a generated demo region lies on disk and on the ground."""

    catalog_path: Path
    labels_path: Path
    nomenclature_path: Path
    crs: str
    bbox: tuple[float, float, float, float]
    grid_origin: tuple[float, float]
    tile_size: int
    resolution: float
    n_s2_items: int
    n_s1_items: int

    def grid(self) -> GridSpec:
        """The tiling grid that covers this region exactly."""
        return GridSpec(
            crs=self.crs, resolution=self.resolution, tile_size=self.tile_size,
            origin_x=self.grid_origin[0], origin_y=self.grid_origin[1],
        )  # fmt: skip


@dataclass(frozen=True)
class _Scene:
    """The static ground truth: parcels, their classes and per-parcel / per-pixel variation."""

    parcels: np.ndarray  # (H, W) parcel index
    truth: np.ndarray  # (P,) class code shown by the imagery
    known: np.ndarray  # (P,) False where the label file says 0 (unknown)
    shift: np.ndarray  # (P,) phenology delay in days (sowing date, variety)
    subtype: np.ndarray  # (P,) True where the parcel is its class's second sub-type (SUBTYPES)
    amp: np.ndarray  # (P,) scale of the green fraction (crop vigour)
    cuts: np.ndarray  # (P, 4) mowing days of year, far future where none
    background: np.ndarray  # (10, H, W) reflectance without canopy
    canopy: np.ndarray  # (10, H, W) reflectance of full canopy
    vigour: np.ndarray  # (H, W) within-parcel factor on the green fraction
    texture_db: np.ndarray  # (2, H, W) static within-parcel backscatter variation
    conditions: Conditions = Conditions()

    @property
    def labels(self) -> np.ndarray:
        """The label raster: class codes, 0 where the parcel is unknown."""
        codes = np.where(self.known, self.truth, 0).astype(np.uint8)
        return codes[self.parcels]

    def class_table(self, values: np.ndarray) -> np.ndarray:
        """Per-parcel rows of a per-class table (indexed by class code - 1)."""
        return values[self.truth - 1]


@dataclass(frozen=True)
class _Layout:
    """Geometry of the region shared by every writer."""

    out_dir: Path
    height: int
    width: int
    seed: int
    conditions: Conditions = Conditions()

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in the CRS, pixel edges."""
        x0, y0 = ORIGIN
        return (x0, y0, x0 + self.width * RESOLUTION, y0 + self.height * RESOLUTION)

    def transform(self, res: float) -> Affine:
        """North-up transform of the region at `res` metres."""
        return Affine(res, 0.0, self.bbox[0], 0.0, -res, self.bbox[3])

    @property
    def lonlat_corners(self) -> list[list[float]]:
        """Closed ring of the region's corners in lon/lat (the items' geometry)."""
        x0, y0, x1, y1 = self.bbox
        lons, lats = warp_transform(CRS, "EPSG:4326", [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0])
        return [[lon, lat] for lon, lat in zip(lons, lats, strict=True)]

    @property
    def lonlat_bbox(self) -> list[float]:
        """The items' lon/lat bbox."""
        lons, lats = zip(*self.lonlat_corners, strict=True)
        return [min(lons), min(lats), max(lons), max(lats)]


def generate_demo_region(
    out_dir: Path,
    *,
    seed: int = 42,
    tiles_x: int = 2,
    tiles_y: int = 2,
    tile_size: int = 64,
    start: str = "2023-01-01",
    end: str = "2023-12-31",
    phenology_shift_days: float = 0.0,
    phenology_stretch: float = 1.0,
    parcel_jitter_days: float = 7.0,
    drought: float = 0.0,
    class_weights: Sequence[float] | None = None,
    subtype_shares: Mapping[int, float] | None = None,
    clear_probability: float = 0.45,
    overcast_probability: float = 0.12,
    s1_tracks: Sequence[S1Track] | None = None,
) -> DemoRegion:
    """Write a seeded synthetic S1/S2 static STAC catalogue with labels; same seed, same bytes.

    The keyword options after `end` make another place or year (issue 15); their defaults give
    the demo region unchanged:

    - `phenology_shift_days`, `phenology_stretch`: every class's season `shift` days later and
      `stretch` times longer (around day SEASON_CENTRE_DOY); `parcel_jitter_days`: the spread of
      each parcel's own delay (sowing dates, varieties);
    - `drought` (0..1): crops and grassland lose up to DROUGHT_DEPTH of their green cover in
      summer (a lower, shorter peak; forest a little);
    - `class_weights`: the share of each class among parcels (CLASSES order);
      `subtype_shares`: {class code: share of its parcels that are SUBTYPES[code]} (spring
      cereals among winter cereals, late maize, grazed pasture among meadows);
    - `clear_probability`, `overcast_probability`: the cloud regime (share of clear and of fully
      overcast S2 acquisitions; the rest are partly cloudy);
    - `s1_tracks`: the S1 relative orbits, alternating date by date (`S1Track`: orbit number,
      time, incidence offset in dB, ascending or descending).
    """
    conditions = Conditions(
        phenology_shift_days=float(phenology_shift_days),
        phenology_stretch=float(phenology_stretch),
        parcel_jitter_days=float(parcel_jitter_days),
        drought=float(drought),
        class_weights=_CLASS_WEIGHTS if class_weights is None else tuple(class_weights),
        subtype_shares=tuple(sorted((subtype_shares or {}).items())),
        clear_probability=float(clear_probability),
        overcast_probability=float(overcast_probability),
        s1_tracks=S1_TRACKS if s1_tracks is None else tuple(S1Track(*t) for t in s1_tracks),
    )
    first, last = _check_arguments(tiles_x, tiles_y, tile_size, start, end)
    layout = _Layout(
        Path(out_dir).resolve(), tiles_y * tile_size, tiles_x * tile_size, seed, conditions
    )
    _prepare_out_dir(layout.out_dir)
    scene = _make_scene(
        np.random.default_rng([seed, 0]), layout.height, layout.width, conditions,
        np.random.default_rng([seed, 3]),
    )  # fmt: skip
    s2_dates = _dates(first, last, S2_STEP_DAYS)
    s1_dates = _dates(first, last, S1_STEP_DAYS)
    _write_readme(layout, scene, len(s2_dates), len(s1_dates))
    s2_items = [_s2_acquisition(layout, scene, day) for day in s2_dates]
    s1_items = [_s1_acquisition(layout, scene, i, day) for i, day in enumerate(s1_dates)]
    label_item = _write_labels(layout, scene, first, last)
    _write_catalog(layout, s2_items, s1_items, label_item)
    return DemoRegion(
        catalog_path=layout.out_dir / "catalog.json",
        labels_path=layout.out_dir / "labels" / "lc.tif",
        nomenclature_path=layout.out_dir / "labels" / "nomenclature.yaml",
        crs=CRS, bbox=layout.bbox, grid_origin=ORIGIN, tile_size=tile_size,
        resolution=RESOLUTION, n_s2_items=len(s2_items), n_s1_items=len(s1_items),
    )  # fmt: skip


def _check_arguments(
    tiles_x: int, tiles_y: int, tile_size: int, start: str, end: str
) -> tuple[date, date]:
    """Reject sizes and periods the generator cannot honour, naming the argument."""
    if tiles_x < 1 or tiles_y < 1:
        raise ValueError(f"tiles_x and tiles_y must be >= 1, got {tiles_x} x {tiles_y}")
    if tile_size < 16 or tile_size % 2:
        # the 20 m bands need an even pixel count; COG blocks are 16 px at least
        raise ValueError(f"tile_size must be even and >= 16, got {tile_size}")
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    if last < first:
        raise ValueError(f"end {end} is before start {start}")
    return first, last


def _prepare_out_dir(out_dir: Path) -> None:
    """Create `out_dir`; clear a previous (even half-written) demo there, refuse anything else."""
    if out_dir.exists() and any(out_dir.iterdir()):
        names = {p.name for p in out_dir.iterdir()}
        readme = out_dir / "README.md"
        # the README is written first, so it marks a demo folder even after a crash
        ours = readme.is_file() and readme.read_text().startswith(README_MARKER)
        if not ours or not names <= set(OUTPUT_NAMES):
            raise FileExistsError(
                f"{out_dir} is not empty and holds no pivotmap synthetic demo: "
                "choose an empty folder"
            )
        for name in names:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _dates(first: date, last: date, step: int) -> list[date]:
    """Acquisition dates every `step` days from `first` up to `last` inclusive."""
    return [first + timedelta(days=d) for d in range(0, (last - first).days + 1, step)]


# ---------------------------------------------------------------------------------------------
# Ground truth


def _make_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    conditions: Conditions | None = None,
    subtype_rng: np.random.Generator | None = None,
) -> _Scene:
    """Draw parcels, their classes and all static variation from one generator (sub-types
    from a second one, so that the demo's draws stay as they were)."""
    conditions = conditions or Conditions()
    parcels = _voronoi_parcels(rng, height, width)
    n = int(parcels.max()) + 1
    truth, known = _assign_classes(rng, n, conditions.weights)
    shares = dict(conditions.subtype_shares)
    draws = (subtype_rng or np.random.default_rng(0)).random(n)
    subtype = draws < np.array([shares.get(int(c), 0.0) for c in truth])
    cuts = np.sort(rng.normal((135, 175, 215, 255), 8, size=(n, 4)), axis=1)
    mown = np.array([CLASSES[c - 1].mowing for c in truth])
    mown[subtype] = [SUBTYPES[int(c)].mowing for c in truth[subtype]]
    cuts[~mown] = 1e6
    cuts[rng.random((n, 4)) < 0.25] = 1e6  # not every meadow is cut four times
    brightness = rng.uniform(0.8, 1.2, n)[parcels]
    texture = (
        1
        + 0.03 * _smooth_field(rng, (height, width), 4)
        + 0.02 * rng.standard_normal((height, width))
    )
    spectra = np.array([c.background for c in CLASSES]), np.array([c.canopy for c in CLASSES])
    background = np.moveaxis(spectra[0][truth[parcels] - 1], -1, 0) * brightness * texture
    canopy = np.moveaxis(spectra[1][truth[parcels] - 1], -1, 0) * rng.uniform(0.9, 1.1, n)[parcels]
    return _Scene(
        parcels=parcels, truth=truth, known=known,
        shift=_parcel_shift(rng.normal(0, 7, n), conditions.parcel_jitter_days), subtype=subtype,
        amp=rng.uniform(0.85, 1.08, n), cuts=cuts,
        background=background, canopy=canopy * texture,
        vigour=1 + 0.06 * _smooth_field(rng, (height, width), 3),
        texture_db=0.6 * rng.standard_normal((2, height, width)), conditions=conditions,
    )  # fmt: skip


def _parcel_shift(draws: np.ndarray, jitter_days: float) -> np.ndarray:
    """Per-parcel delays of spread `jitter_days` from N(0, 7) draws, clipped at ~2.1 std
    (±15 days at the demo's 7)."""
    scale = jitter_days / 7
    return np.clip(draws * scale, -15 * scale, 15 * scale)


def _voronoi_parcels(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Parcel index per pixel: Voronoi cells of one jittered seed per grid cell.

    One seed per cell keeps parcel sizes realistic at any region size, and the nearest seed is
    searched in the 3x3 neighbouring cells only, so the cost is linear in the pixel count.
    """
    c = PARCEL_CELL_PX
    ny, nx = -(-height // c), -(-width // c)
    cell_rows, cell_cols = np.mgrid[0:ny, 0:nx]
    seed_r = cell_rows * c + np.floor(rng.random((ny, nx)) * np.minimum(c, height - cell_rows * c))
    seed_c = cell_cols * c + np.floor(rng.random((ny, nx)) * np.minimum(c, width - cell_cols * c))
    angle = rng.uniform(0, np.pi)  # fields share an orientation, as in a real parcel layout
    far = -1e9  # far-away seeds outside the region
    seed_r, seed_c = np.pad(seed_r, 1, constant_values=far), np.pad(seed_c, 1, constant_values=far)
    ids = np.pad(np.arange(ny * nx).reshape(ny, nx), pad_width=1, constant_values=-1)
    rows, cols = np.mgrid[0:height, 0:width]
    best = np.full((height, width), np.inf)
    parcels = np.zeros((height, width), dtype=np.int64)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            ci, cj = rows // c + di, cols // c + dj
            dr, dc = rows - seed_r[ci, cj], cols - seed_c[ci, cj]
            along = dr * np.cos(angle) + dc * np.sin(angle)
            across = -dr * np.sin(angle) + dc * np.cos(angle)
            dist = along**2 + (1.8 * across) ** 2  # elongated fields
            closer = dist < best
            best[closer], parcels[closer] = dist[closer], ids[ci, cj][closer]
    return parcels


def _assign_classes(
    rng: np.random.Generator, n: int, weights: tuple[float, ...] = _CLASS_WEIGHTS
) -> tuple[np.ndarray, np.ndarray]:
    """Class code per parcel with every class labelled at least once when n allows it."""
    codes = np.array([c.code for c in CLASSES])
    n_unknown = max(1, round(0.06 * n)) if n >= len(codes) + 2 else 0
    n_known = n - n_unknown
    guaranteed = rng.permutation(codes)[: min(len(codes), n_known)]
    known_codes = np.concatenate(
        [guaranteed, rng.choice(codes, size=n_known - len(guaranteed), p=weights)]
    )
    truth = np.concatenate([known_codes, rng.choice(codes, size=n_unknown, p=weights)])
    known = np.arange(n) < n_known
    order = rng.permutation(n)
    return truth[order].astype(np.int64), known[order]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (periodic, by FFT), standardised to mean 0 and std 1."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def _green_fraction(scene: _Scene, day: date) -> np.ndarray:
    """Per-pixel green canopy fraction on `day` from each parcel's class phenology."""
    doy = day.timetuple().tm_yday
    conditions = scene.conditions
    season = conditions.season_day(doy)  # the day of the class curves this date shows
    per_parcel = np.zeros(scene.truth.shape)
    for model in CLASSES:
        kinds = [(scene.truth == model.code) & ~scene.subtype, None]
        if model.code in SUBTYPES:
            kinds[1] = (scene.truth == model.code) & scene.subtype
        for sel, curve in zip(kinds, (model.green, SUBTYPES.get(model.code)), strict=True):
            if sel is None or curve is None or not sel.any():
                continue
            knots = curve if isinstance(curve, tuple) else curve.green
            knot_days, knot_values = zip(*knots, strict=True)
            per_parcel[sel] = np.interp((season - scene.shift[sel]) % 365, knot_days, knot_values)
    since_cut = season - scene.cuts
    # a cut removes most green biomass, which regrows in a few weeks
    dip = np.where(since_cut >= 0, 0.65 * np.exp(-np.maximum(since_cut, 0) / 20), 0.0)
    per_parcel *= np.prod(1 - dip, axis=1) * scene.amp
    loss = conditions.drought_loss(doy)
    if loss:
        per_parcel *= 1 - loss * np.asarray(_DROUGHT_SENSITIVITY)[scene.truth - 1]
    return np.clip(per_parcel[scene.parcels] * scene.vigour, 0, 1)


# ---------------------------------------------------------------------------------------------
# Sentinel-2


def _s2_acquisition(layout: _Layout, scene: _Scene, day: date) -> pystac.Item:
    """Simulate, write and describe one Sentinel-2 L2A acquisition over the region."""
    rng = np.random.default_rng([layout.seed, 2, day.toordinal()])
    when = datetime.combine(day, S2_TIME, tzinfo=UTC)
    sun_az, sun_el = _sun_angles(when, *np.mean(layout.lonlat_corners[:4], axis=0))
    dn, scl = _simulate_s2(rng, scene, day, sun_az, sun_el)
    item_id = f"S2X_{MGRS_TILE}_{day:%Y%m%d}_0_L2A"
    folder = layout.out_dir / "sentinel-2-l2a" / item_id
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for index, band in enumerate(S2_BANDS):
        data = dn[index] if band.gsd == 10 else _block_mean(dn[index]).round().astype(np.uint16)
        path = folder / f"{band.file}.tif"
        files[band.key] = _write_cog(path, data, layout.transform(band.gsd), 0)
    path = folder / "SCL.tif"
    files["scl"] = _write_cog(path, scl, layout.transform(20), 0, resampling="nearest")
    return _s2_item(layout, item_id, when, _s2_properties(scl, sun_az, sun_el), files)


def _simulate_s2(
    rng: np.random.Generator, scene: _Scene, day: date, sun_az: float, sun_el: float
) -> tuple[np.ndarray, np.ndarray]:
    """DN (10 bands at 10 m, uint16, never 0) and the 20 m SCL of one acquisition."""
    green = _green_fraction(scene, day)
    surface = scene.background * (1 - green) + scene.canopy * green
    surface = surface + rng.normal(0, 0.004 + 0.02 * surface)  # sensor and BRDF noise
    surface[0] += rng.uniform(0, 0.01)  # residual haze after atmospheric correction
    cloud, cirrus, shadow = _cloud_layers(rng, surface.shape[1:], sun_az, sun_el, scene.conditions)
    observed = _through_atmosphere(surface, cloud, cirrus, shadow)
    layers_20m = (_block_mean(a) for a in (surface, cloud, cirrus, shadow))
    scl = _scene_classification(rng, *layers_20m)
    dn = np.clip(np.round(observed * 10000), 1, 65535).astype(np.uint16)  # 0 is nodata
    return dn, scl


def _cloud_layers(
    rng: np.random.Generator,
    shape: tuple[int, int],
    sun_az: float,
    sun_el: float,
    conditions: Conditions | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cloud opacity, cirrus depth and shadow strength (0..1 each) at 10 m for one date."""
    conditions = conditions or Conditions()
    clear, overcast = conditions.clear_probability, 1 - conditions.overcast_probability
    m = SHADOW_MARGIN_PX
    big = (shape[0] + 2 * m, shape[1] + 2 * m)
    regime = rng.random()
    cover = 0.0 if regime < clear else 1.0 if regime > overcast else rng.uniform(0.05, 0.6)
    field = _smooth_field(rng, big, rng.uniform(5, 15))
    if cover >= 1:
        opacity = np.clip(0.9 + 0.1 * field, 0.75, 1.0)
    elif cover > 0:
        opacity = np.clip((field - np.quantile(field, 1 - cover)) / 0.8, 0, 1)
    else:
        opacity = np.zeros(big)
    cirrus = np.zeros(shape)
    if rng.random() < (0.3 if 0 < cover < 1 else 0.1):
        haze = _smooth_field(rng, shape, 20)
        cirrus = np.clip(haze - rng.uniform(-0.5, 1.0), 0, 1) * rng.uniform(0.03, 0.08)
    # a cloud at height h casts its shadow h / tan(elevation) away from the sun
    length = min(rng.uniform(150, 600) / math.tan(math.radians(sun_el)) / RESOLUTION, m)
    d_row = round(length * math.cos(math.radians(sun_az)))
    d_col = round(-length * math.sin(math.radians(sun_az)))
    shadow = opacity[m - d_row : m - d_row + shape[0], m - d_col : m - d_col + shape[1]]
    return opacity[m : m + shape[0], m : m + shape[1]], cirrus, shadow


def _through_atmosphere(
    surface: np.ndarray, cloud: np.ndarray, cirrus: np.ndarray, shadow: np.ndarray
) -> np.ndarray:
    """Observed reflectance: clouds brighten, cirrus adds a veil, shadows darken the ground."""
    bands = len(S2_BANDS)
    observed = surface * (1 - cloud) + np.reshape(_CLOUD, (bands, 1, 1)) * cloud
    observed = observed + np.reshape(_CIRRUS, (bands, 1, 1)) * cirrus
    return observed * (1 - 0.65 * shadow * (1 - cloud))


def _scene_classification(
    rng: np.random.Generator,
    surface: np.ndarray,
    cloud: np.ndarray,
    cirrus: np.ndarray,
    shadow: np.ndarray,
) -> np.ndarray:
    """Sen2Cor-like SCL at 20 m from the ground spectra and the atmosphere layers."""
    red, nir = surface[_RED], surface[_NIR08]
    ndvi = (nir - red) / np.maximum(nir + red, 1e-6)
    scl = np.where((nir < 0.06) & (ndvi < 0.1), 6, np.where(ndvi > 0.4, 4, 5)).astype(np.uint8)
    scl[rng.random(scl.shape) < 0.005] = 7  # scattered unclassified pixels, as Sen2Cor leaves
    scl[cloud > 0.08] = 7  # cloud edges: low cloud probability
    scl[shadow * (1 - cloud) > 0.35] = 3
    scl[(cirrus > 0.025) & (cloud <= 0.25)] = 10
    scl[cloud > 0.25] = 8
    scl[cloud > 0.6] = 9
    return scl


def _s2_properties(scl: np.ndarray, sun_az: float, sun_el: float) -> dict[str, Any]:
    """Earth Search v1 item properties; percentages are SCL shares over the region."""
    counts = np.bincount(scl.ravel(), minlength=len(SCL_NAMES)) * 100.0 / scl.size
    shares = {
        f"s2:{name}_percentage": round(float(counts[i]), 4) for i, name in enumerate(SCL_NAMES)
    }
    shares["s2:nodata_pixel_percentage"] = shares.pop("s2:nodata_percentage")
    return {
        "platform": "sentinel-2", "constellation": "sentinel-2", "instruments": ["msi"],
        "proj:epsg": EPSG, "mgrs:utm_zone": int(MGRS_TILE[:2]),
        "mgrs:latitude_band": MGRS_TILE[2], "mgrs:grid_square": MGRS_TILE[3:],
        "grid:code": f"MGRS-{MGRS_TILE}", "s2:mgrs_tile": MGRS_TILE,
        "s2:product_type": "S2MSI2A", "s2:sequence": "0",
        "view:sun_azimuth": round(sun_az, 4), "view:sun_elevation": round(sun_el, 4),
        "eo:cloud_cover": round(float(np.isin(scl, SCL_CLOUDY).mean() * 100), 4),
        **shares, SYNTHETIC_KEY: True,
    }  # fmt: skip


def _s2_template(band: _Band) -> dict[str, Any]:
    """What one Earth Search v1 band asset holds in every item."""
    return {
        "type": COG_MEDIA_TYPE, "title": f"{band.description} - {band.gsd}m",
        "roles": ["data", "reflectance"], "gsd": band.gsd, "eo:bands": [_eo_band(band)],
        # DN = reflectance x 10000: readers apply scale 0.0001 and offset 0
        "raster:bands": [
            {"nodata": 0, "data_type": "uint16", "spatial_resolution": band.gsd,
             "scale": 0.0001, "offset": 0}
        ],
    }  # fmt: skip


def _eo_band(band: _Band) -> dict[str, Any]:
    """The `eo:bands` entry of one band, as Earth Search writes it."""
    return {
        "name": band.key, "common_name": band.common_name, "description": band.description,
        "center_wavelength": band.center, "full_width_half_max": band.fwhm,
    }  # fmt: skip


def _s1_template(key: str) -> dict[str, Any]:
    """One polarisation asset: float32 linear power, nodata -32768 as Planetary Computer."""
    pol = key.upper()
    return {
        "type": COG_MEDIA_TYPE,
        "title": f"{pol}: vertical transmit, {'vertical' if key == 'vv' else 'horizontal'} receive",
        "description": f"SYNTHETIC {pol} backscatter as linear power (dB = 10 log10(value)).",
        "roles": ["data"],
        "raster:bands": [{"nodata": -32768.0, "data_type": "float32", "spatial_resolution": 20.0}],
    }


S2_ASSET_TEMPLATES: dict[str, dict[str, Any]] = {b.key: _s2_template(b) for b in S2_BANDS} | {
    "scl": {
        "type": COG_MEDIA_TYPE, "title": "Scene classification map (SCL)",
        "roles": ["data", "reflectance"],
        "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 20}],
    }
}  # fmt: skip
S1_ASSET_TEMPLATES: dict[str, dict[str, Any]] = {k: _s1_template(k) for k in S1_ASSET_KEYS}


def _s2_item(
    layout: _Layout, item_id: str, when: datetime, properties: dict[str, Any], files: dict
) -> pystac.Item:
    """Assemble the STAC item of one S2 acquisition (per-asset grid, as Earth Search)."""
    item = _base_item(layout, item_id, when, properties, _S2_EXTENSIONS)
    for key, template in S2_ASSET_TEMPLATES.items():
        res = template.get("gsd", 20)
        grid = {
            "proj:shape": [layout.height * 10 // res, layout.width * 10 // res],
            "proj:transform": list(layout.transform(res))[:6],
        }
        item.add_asset(key, pystac.Asset.from_dict({**template, **grid, **files[key]}))
    return item


_EXT = "https://stac-extensions.github.io"
_S2_EXTENSIONS = [
    f"{_EXT}/eo/v1.1.0/schema.json", f"{_EXT}/raster/v1.1.0/schema.json",
    f"{_EXT}/projection/v1.1.0/schema.json", f"{_EXT}/view/v1.0.0/schema.json",
    f"{_EXT}/mgrs/v1.0.0/schema.json", f"{_EXT}/grid/v1.0.0/schema.json",
    f"{_EXT}/file/v2.0.0/schema.json",
]  # fmt: skip
_S1_EXTENSIONS = [
    f"{_EXT}/sar/v1.0.0/schema.json", f"{_EXT}/sat/v1.0.0/schema.json",
    f"{_EXT}/projection/v1.1.0/schema.json", f"{_EXT}/file/v2.0.0/schema.json",
    f"{_EXT}/raster/v1.1.0/schema.json",
]  # fmt: skip
_LABEL_EXTENSIONS = [
    f"{_EXT}/projection/v1.1.0/schema.json", f"{_EXT}/file/v2.0.0/schema.json",
    f"{_EXT}/raster/v1.1.0/schema.json",
]  # fmt: skip


def _sun_angles(when: datetime, lon: float, lat: float) -> tuple[float, float]:
    """Approximate solar azimuth and elevation in degrees (within ~1 degree: enough here)."""
    doy = when.timetuple().tm_yday
    decl = math.radians(23.44) * math.sin(2 * math.pi * (284 + doy) / 365)
    hour_angle = math.radians(15 * (when.hour + when.minute / 60 + lon / 15 - 12))
    phi = math.radians(lat)
    elevation = math.asin(
        math.sin(phi) * math.sin(decl) + math.cos(phi) * math.cos(decl) * math.cos(hour_angle)
    )
    cos_az = (math.sin(decl) - math.sin(elevation) * math.sin(phi)) / (
        math.cos(elevation) * math.cos(phi)
    )
    azimuth = math.degrees(math.acos(max(-1.0, min(1.0, cos_az))))
    return (360 - azimuth if hour_angle > 0 else azimuth), math.degrees(elevation)


# ---------------------------------------------------------------------------------------------
# Sentinel-1


def _s1_acquisition(layout: _Layout, scene: _Scene, index: int, day: date) -> pystac.Item:
    """Simulate, write and describe one Sentinel-1 RTC acquisition (linear power, 20 m)."""
    rng = np.random.default_rng([layout.seed, 1, day.toordinal()])
    tracks = layout.conditions.s1_tracks
    track = tracks[index % len(tracks)]
    when = datetime.combine(day, track.clock, tzinfo=UTC)
    green = _green_fraction(scene, day)
    moisture, wind = rng.normal(0, 1.0), rng.uniform(0, 6)
    incidence = track.incidence_db  # each track sees the region at its own angle
    item_id = f"S1X_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_rtc"
    folder = layout.out_dir / "sentinel-1-rtc" / item_id
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for pol, table in enumerate((_VV_TABLE, _VH_TABLE)):
        bare, full = (scene.class_table(table[:, k])[scene.parcels] for k in (0, 1))
        soil_weight = scene.class_table(_MOISTURE)[scene.parcels] * (1 - green)
        wind_weight = scene.class_table(_WIND)[scene.parcels] * (1.0 if pol == 0 else 0.5)
        db = bare + (full - bare) * green + moisture * soil_weight + wind * wind_weight
        power = 10 ** ((db + incidence + scene.texture_db[pol]) / 10)
        speckled = power * rng.gamma(4.4, 1 / 4.4, power.shape)  # single-look-ish 10 m speckle
        data = _block_mean(speckled).astype(np.float32)  # 2x2 multilook to 20 m
        key = S1_ASSET_KEYS[pol]
        files[key] = _write_cog(folder / f"{key}.tif", data, layout.transform(20), -32768.0)
    return _s1_item(layout, item_id, when, track, files)


_VV_TABLE = np.array([c.vv_db for c in CLASSES])
_VH_TABLE = np.array([c.vh_db for c in CLASSES])
_MOISTURE = np.array([c.moisture for c in CLASSES])
_WIND = np.array([c.wind for c in CLASSES])


def _s1_item(
    layout: _Layout, item_id: str, when: datetime, track: S1Track, files: dict
) -> pystac.Item:
    """Assemble the STAC item of one S1 acquisition in the Planetary Computer layout."""
    properties = {
        "platform": "SENTINEL-1", "constellation": "Sentinel-1",
        "sar:polarizations": ["VV", "VH"], "sar:instrument_mode": "IW",
        "sar:product_type": "GRD", "sar:frequency_band": "C", "sar:center_frequency": 5.405,
        "sar:observation_direction": "right", "sar:pixel_spacing_range": 20.0,
        "sar:pixel_spacing_azimuth": 20.0, "sat:orbit_state": track.state,
        "sat:relative_orbit": track.orbit, "proj:epsg": EPSG, "proj:bbox": list(layout.bbox),
        "proj:shape": [layout.height // 2, layout.width // 2],
        "proj:transform": list(layout.transform(20)), SYNTHETIC_KEY: True,
    }  # fmt: skip
    item = _base_item(layout, item_id, when, properties, _S1_EXTENSIONS)
    for key, template in S1_ASSET_TEMPLATES.items():
        item.add_asset(key, pystac.Asset.from_dict({**template, **files[key]}))
    return item


# ---------------------------------------------------------------------------------------------
# Labels, catalogue, files


def _write_labels(layout: _Layout, scene: _Scene, first: date, last: date) -> pystac.Item:
    """Write labels/lc.tif, labels/nomenclature.yaml and their standalone STAC item."""
    folder = layout.out_dir / "labels"
    folder.mkdir(parents=True, exist_ok=True)
    colormap = {c.code: (*_hex_rgb(c.color), 255) for c in CLASSES} | {0: (0, 0, 0, 0)}
    lc = _write_cog(
        folder / "lc.tif", scene.labels, layout.transform(10), 0, resampling="nearest",
        colormap=colormap,
    )  # fmt: skip
    nomenclature = folder / "nomenclature.yaml"
    nomenclature.write_text(yaml.safe_dump(_nomenclature_dict(layout.seed), sort_keys=False))
    start = datetime.combine(first, time(0, 0), tzinfo=UTC)
    properties = {
        "proj:epsg": EPSG, "proj:shape": [layout.height, layout.width],
        "proj:transform": list(layout.transform(10))[:6], "proj:bbox": list(layout.bbox),
        "start_datetime": pystac.utils.datetime_to_str(start),
        "end_datetime": f"{last.isoformat()}T23:59:59Z", SYNTHETIC_KEY: True,
    }  # fmt: skip
    item = _base_item(layout, f"pivotmap-demo-seed{layout.seed}-labels", None, properties,
                      _LABEL_EXTENSIONS)  # fmt: skip
    item.add_asset("lc", _label_asset(lc))
    item.add_asset("nomenclature", _nomenclature_asset(nomenclature))
    item.set_self_href(str(folder / "labels.json"))
    return item


# More plain-language phrasings per class code: text alignment and concept maps (issue 9).
PHRASINGS = {
    1: ("a field of winter wheat or barley", "cereal crops harvested in summer",
        "farmland green in spring and bare after the July harvest"),
    2: ("a maize field", "corn grown for grain or silage",
        "a summer crop on bare soil until late spring"),
    3: ("a meadow or pasture", "grass mown for hay or grazed by cattle",
        "green grass all year round"),
    4: ("a deciduous forest", "woodland of oak, beech and other broadleaf trees",
        "trees that lose their leaves in winter"),
    5: ("an urban area", "houses, streets and buildings",
        "impervious sealed surfaces such as concrete and asphalt"),
    6: ("a lake or river", "open water", "a water body such as a pond or reservoir"),
}  # fmt: skip


def _nomenclature_dict(seed: int) -> dict[str, Any]:
    """The nomenclature YAML content read by `pivotmap.tasks.nomenclature.load_nomenclature`."""
    return {
        "name": f"pivotmap synthetic demo (seed {seed})",
        "unknown_codes": [0],
        "classes": [
            {
                "code": c.code, "name": c.name, "color": c.color, "description": c.description,
                "descriptions": list(PHRASINGS[c.code]),
            }
            for c in CLASSES
        ],
    }  # fmt: skip


def _label_asset(file_fields: dict[str, Any]) -> pystac.Asset:
    """The land-cover label COG asset with its class values."""
    values = [{"values": [0], "summary": "Unknown"}]
    values += [{"values": [c.code], "summary": c.name} for c in CLASSES]
    return pystac.Asset(
        href=file_fields.pop("href"),
        media_type=COG_MEDIA_TYPE,
        title="SYNTHETIC land-cover labels (LC)",
        roles=["data", "labels"],
        extra_fields={
            "raster:bands": [{"nodata": 0, "data_type": "uint8", "spatial_resolution": 10}],
            "file:values": values, **file_fields,
        },
    )  # fmt: skip


def _nomenclature_asset(path: Path) -> pystac.Asset:
    """The nomenclature YAML as a metadata asset of the label item."""
    fields = _file_fields(path)
    return pystac.Asset(
        href=fields.pop("href"),
        media_type="application/yaml",
        title="Label nomenclature: code, name, colour, description",
        roles=["metadata"],
        extra_fields=fields,
    )


def _base_item(
    layout: _Layout,
    item_id: str,
    when: datetime | None,
    properties: dict[str, Any],
    extensions: list[str],
) -> pystac.Item:
    """A STAC item whose footprint is the whole region."""
    return pystac.Item(
        id=item_id,
        geometry={"type": "Polygon", "coordinates": [layout.lonlat_corners]},
        bbox=layout.lonlat_bbox,
        datetime=when,
        properties=dict(properties),
        stac_extensions=list(extensions),
    )


def _write_catalog(
    layout: _Layout, s2_items: list[pystac.Item], s1_items: list[pystac.Item], labels: pystac.Item
) -> None:
    """Save the self-contained catalogue (relative hrefs) and the standalone label item."""
    catalog = pystac.Catalog(
        id=f"pivotmap-demo-seed{layout.seed}",
        title=f"pivotmap SYNTHETIC demo region (seed {layout.seed})",
        description=_synthetic_notice(layout.seed) + " See README.md.",
        extra_fields={SYNTHETIC_KEY: True},
    )
    catalog.add_child(_collection(layout, "sentinel-2-l2a", s2_items))
    catalog.add_child(_collection(layout, "sentinel-1-rtc", s1_items))
    catalog.normalize_hrefs(str(layout.out_dir))
    catalog.add_link(
        pystac.Link(
            "related", "./labels/labels.json",  # pystac only relativises hierarchical links
            media_type=pystac.MediaType.GEOJSON,
            title="SYNTHETIC reference labels (LC COG): standalone STAC Item, not in a collection",
        )
    )  # fmt: skip
    catalog.make_all_asset_hrefs_relative()
    labels.set_root(catalog)
    labels.make_asset_hrefs_relative()
    with _stac_version(STAC_VERSION):
        catalog.save(pystac.CatalogType.SELF_CONTAINED)
        labels.save_object(include_self_link=False)


@contextmanager
def _stac_version(version: str) -> Iterator[None]:
    """Write `version` as `stac_version` (pystac writes its newest), then restore the setting."""
    previous = pystac.version.STACVersion._override_version
    pystac.set_stac_version(version)
    try:
        yield
    finally:
        pystac.set_stac_version(previous)


def _collection(layout: _Layout, name: str, items: list[pystac.Item]) -> pystac.Collection:
    """One of the two child collections, holding `items`."""
    is_s2 = name == "sentinel-2-l2a"
    times = [item.datetime for item in items if item.datetime is not None]
    interval: list[datetime | None] = [min(times), max(times)] if times else [None, None]
    extent = pystac.Extent(
        pystac.SpatialExtent([layout.lonlat_bbox]), pystac.TemporalExtent([interval])
    )
    collection = pystac.Collection(
        id=name,
        title="Sentinel-2 Level-2A (SYNTHETIC)" if is_s2 else "Sentinel-1 RTC (SYNTHETIC)",
        description=_collection_description(layout.seed, is_s2),
        extent=extent,
        license=LICENSE,
        keywords=["Sentinel", "SYNTHETIC", "pivotmap demo"],
        stac_extensions=[f"{_EXT}/item-assets/v1.0.0/schema.json"],
        extra_fields={
            "item_assets": S2_ASSET_TEMPLATES if is_s2 else S1_ASSET_TEMPLATES,
            SYNTHETIC_KEY: True,
        },
    )
    for item in items:
        collection.add_item(item)
    return collection


def _synthetic_notice(seed: int) -> str:
    """The sentence every top-level description carries."""
    return (
        f"SYNTHETIC data generated by pivotmap (pivotmap.tasks.synthetic, seed {seed}); "
        "NOT real Sentinel data: a demo and test region with six land-cover classes."
    )


def _collection_description(seed: int, is_s2: bool) -> str:
    """Collection description stating the value conventions."""
    if is_s2:
        detail = (
            "Sentinel-2 L2A-like reflectance, one item per simulated acquisition every 5 days, "
            "Earth Search v1 asset keys. DN = reflectance x 10000 (scale 0.0001, offset 0), "
            "nodata 0. eo:cloud_cover = % of SCL pixels in classes [3, 8, 9, 10] over the region."
        )
    else:
        detail = (
            "Sentinel-1 RTC-like VV/VH backscatter, one item per simulated acquisition every 6 "
            "days, Planetary Computer layout: float32 LINEAR power (dB = 10 log10), 20 m, "
            "nodata -32768."
        )
    return f"{_synthetic_notice(seed)} {detail}"


def _write_cog(
    path: Path,
    data: np.ndarray,
    transform: Affine,
    nodata: float,
    *,
    resampling: str = "average",
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
) -> dict[str, Any]:
    """Write a single-band COG (DEFLATE, small blocks, no timestamps); return asset file fields."""
    block = 128  # the smallest block GDAL's COG driver accepts (smaller values warn, then 512)
    profile = {
        "driver": "COG", "width": data.shape[1], "height": data.shape[0], "count": 1,
        "dtype": data.dtype.name, "crs": CRS, "transform": transform, "nodata": nodata,
        "compress": "DEFLATE", "predictor": "YES", "blocksize": block,
        # overviews of a small raster help no reader and double the write time (a temp file each)
        "overviews": "AUTO" if max(data.shape) > OVERVIEW_MIN_PX else "NONE",
        "overview_resampling": resampling,
    }  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        if colormap is not None:
            dst.write_colormap(1, colormap)
    return _file_fields(path)


def _file_fields(path: Path) -> dict[str, Any]:
    """Absolute href plus `file:size` and `file:checksum` (sha2-256 multihash)."""
    payload = path.read_bytes()
    return {
        "href": str(path),
        "file:size": len(payload),
        "file:checksum": "1220" + hashlib.sha256(payload).hexdigest(),
    }


def _block_mean(array: np.ndarray) -> np.ndarray:
    """Average 2x2 pixel blocks over the last two axes (10 m to 20 m)."""
    *lead, h, w = array.shape
    return array.reshape(*lead, h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def _hex_rgb(color: str) -> tuple[int, int, int]:
    """'#rrggbb' to an (r, g, b) tuple."""
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def _write_readme(layout: _Layout, scene: _Scene, n_s2: int, n_s1: int) -> None:
    """README.md saying loudly that the data are synthetic, with the layout and encodings."""
    counts = np.bincount(scene.labels.ravel(), minlength=len(CLASSES) + 1)
    rows = [f"| {c.code} | {c.name} | {counts[c.code]} |" for c in CLASSES]
    x0, y0, x1, y1 = layout.bbox
    text = _README.format(
        marker=README_MARKER, seed=layout.seed, notice=_synthetic_notice(layout.seed),
        bbox=f"[{x0}, {y0}, {x1}, {y1}]", height=layout.height, width=layout.width,
        n_s2=n_s2, n_s1=n_s1, unknown=counts[0], class_rows="\n".join(rows),
    )  # fmt: skip
    changed = _changed_conditions(layout.conditions)
    if changed:
        text += "\n## Another place or year (options of `generate_demo_region`)\n\n" + changed
    (layout.out_dir / "README.md").write_text(text)


def _changed_conditions(conditions: Conditions) -> str:
    """Markdown lines naming the options that differ from the demo's defaults ('' if none)."""
    from dataclasses import fields

    default = Conditions()
    lines = [
        f"- `{f.name}`: {getattr(conditions, f.name)!r}"
        for f in fields(Conditions)
        if getattr(conditions, f.name) != getattr(default, f.name)
    ]
    return "\n".join(lines) + "\n" if lines else ""


_README = """{marker} (seed {seed}) — SYNTHETIC DATA

**{notice}** Nothing here was observed by a satellite. It is regenerated byte for byte by
`pivotmap.tasks.synthetic.generate_demo_region(out_dir, seed={seed}, ...)`.

Region: EPSG:32631, bounds {bbox} (pixel edges), {height} x {width} pixels of 10 m, aligned to
the grid `GridSpec(crs="EPSG:32631", resolution=10, origin_x=500000, origin_y=5630000)`.

## Layout (as the real sample `flanders-31UDS-2018`)

```
catalog.json                               root (2 collections; 'related' -> labels/labels.json)
sentinel-2-l2a/collection.json             {n_s2} items, one every 5 days
sentinel-2-l2a/<id>/<id>.json, B02.tif ... B12.tif, B8A.tif, SCL.tif
sentinel-1-rtc/collection.json             {n_s1} items, one every 6 days
sentinel-1-rtc/<id>/<id>.json, vv.tif, vh.tif
labels/lc.tif                              10 m class codes (0 = unknown)
labels/nomenclature.yaml                   codes, names, colours, descriptions
labels/labels.json                         standalone STAC Item for the labels
```

## Encodings

| asset | dtype | nodata | res | values |
|---|---|---|---|---|
| blue, green, red, nir | uint16 | 0 | 10 m | reflectance x 10000 (raster:bands scale 0.0001) |
| rededge1-3, nir08, swir16, swir22 | uint16 | 0 | 20 m | same |
| scl | uint8 | 0 | 20 m | Sen2Cor-like scene classes 3..10 |
| vv, vh | float32 | -32768 | 20 m | linear power = 10**(dB/10) |
| labels/lc.tif | uint8 | 0 | 10 m | class codes below, 0 = unknown |

`eo:cloud_cover` is the share of SCL pixels in classes 3, 8, 9, 10. All rasters are COGs
(DEFLATE, 32 px blocks at 10 m and 16 px at 20 m). Every item has `"pivotmap:synthetic": true`.

## Classes (label pixels; {unknown} pixels are unknown, code 0)

| code | name | pixels |
|---|---|---|
{class_rows}
"""
