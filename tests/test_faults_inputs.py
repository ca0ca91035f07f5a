"""Bad inputs through the `pivotmap` command line, one case each, on copies of the tiny region.

Each ends either in a recorded skip (the item or tile and its reason in reports/ingest.json, exit
0, the rest of the data used) or in exit 1 with one `pivotmap: error:` line naming the input, where
carrying on would give a wrong map. tests/test_ingest.py covers corrupt/missing COGs and items
without SCL on the real Flanders patch (skipped where it is absent); here they run on synthetic
data so CI always checks them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import rasterio

from pivotmap.flows.cli import main
from tests import faults_data as fd

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("inputs") / "data"
    fd.make_region(data)
    return data


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A private copy of the region that a test may damage."""
    return fd.copy_region(pristine, tmp_path / "data")


def _cli(capsys, stage: str, config: Path, out: Path) -> tuple[int, dict, list[str]]:
    code = main([stage, "--config", str(config), "--out", str(out), "--json"])
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("pivotmap: error:")]
    return code, json.loads(captured.out.strip().splitlines()[-1]), errors


def _fails_naming(capsys, stage, config, out, *names: str) -> str:
    code, summary, errors = _cli(capsys, stage, config, out)
    assert code == 1 and summary["ok"] is False and len(errors) == 1, errors
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def _config(data: Path, **sections) -> Path:
    return fd.write_config(data.parent / "run.yaml", fd.config_dict(data, **sections))


# ---------------------------------------------------------------------------- recorded skips


def _asset(data: Path, index: int, key: str) -> tuple[str, Path]:
    item = fd.s2_items(data)[index]
    return fd.item_doc(item)["id"], fd.asset_path(item, key)


def _corrupt(data):
    item, path = _asset(data, 3, "red")
    fd.corrupt_cog(path)
    return item, "B04.tif"


def _truncated(data):
    item, path = _asset(data, 4, "nir")
    fd.truncate_cog(path)
    return item, "B08.tif"


def _missing_file(data):
    item, path = _asset(data, 5, "swir16")
    path.unlink()
    return item, "B11.tif"


def _missing_crs(data):
    item, path = _asset(data, 6, "red")
    fd.strip_crs(path)
    return item, "has no CRS"


def _wrong_crs(data):
    item, path = _asset(data, 7, "scl")
    fd.set_crs(path, "EPSG:32632")  # same numbers, another UTM zone: 6 degrees east
    return item, "wrong CRS"


SKIPPED = {
    "corrupt COG": _corrupt,
    "truncated COG": _truncated,
    "missing asset file": _missing_file,
    "missing CRS": _missing_crs,
    "wrong CRS": _wrong_crs,
}


@pytest.mark.parametrize("case", list(SKIPPED))
def test_unreadable_item_is_skipped_and_named(case, data, tmp_path, capsys, prefect_server):
    item, detail = SKIPPED[case](data)
    out = tmp_path / "out"
    code, summary, _ = _cli(capsys, "ingest", _config(data), out)
    assert code == 0
    s2 = json.loads((out / "reports" / "ingest.json").read_text())["modalities"]["s2"]
    (skip,) = s2["skipped_items"]
    assert skip["item"] == item and skip["stage"] == "read"
    assert skip["reason"].startswith("cannot read COG") and detail in skip["reason"]
    assert s2["items_used"] == 25  # found and planned; the bad one's date is empty
    with rasterio.Env():
        import xarray as xr

        obs = xr.open_zarr(out / "cube" / "obs_s2.zarr", chunks=None)
        day = fd.item_doc(fd.s2_items(data)[0])["properties"]["datetime"][:10]
        assert obs.B04.sel(time=day).notnull().any()  # the good items are in the cube


def test_missing_asset_key_is_skipped_by_the_item_checks(data, tmp_path, capsys, prefect_server):
    item = fd.edit_item(fd.s2_items(data)[8], lambda doc: doc["assets"].pop("nir"))
    out = tmp_path / "out"
    code, _, _ = _cli(capsys, "ingest", _config(data), out)
    assert code == 0
    s2 = json.loads((out / "reports" / "ingest.json").read_text())["modalities"]["s2"]
    (skip,) = s2["skipped_items"]
    assert skip["item"] == item and s2["items_used"] == 24


def test_item_without_scl_stops_or_is_skipped(data, tmp_path, capsys, prefect_server):
    item = fd.edit_item(fd.s2_items(data)[2], lambda doc: doc["assets"].pop("scl"))
    _fails_naming(capsys, "ingest", _config(data), tmp_path / "a", item, "s2_without_scl")
    config = _config(data, ingest={"s2_without_scl": "skip"})
    code, summary, _ = _cli(capsys, "ingest", config, tmp_path / "b")
    (skip,) = summary["modalities"]["s2"]["skipped_items"]
    assert code == 0 and skip["item"] == item and "SCL" in skip["reason"]


def test_all_cloud_tile_is_named_in_the_report(data, tmp_path, capsys, prefect_server):
    for item in fd.s2_items(data):
        fd.cloud_cover(fd.asset_path(item, "scl"), fd.ORIGIN[0] + fd.TILE * 10)  # east tile
    out = tmp_path / "out"
    code, summary, _ = _cli(capsys, "ingest", _config(data), out)
    assert code == 0
    (empty,) = summary["modalities"]["s2"]["tiles_without_data"]
    assert empty["tile"] == "E500320mN5630000m" and "no valid S2 observation" in empty["reason"]
    assert summary["modalities"]["s1"]["tiles_without_data"] == []


def test_all_cloud_region_stops_at_the_pivot_gate(data, tmp_path, capsys, prefect_server):
    for item in fd.s2_items(data):
        fd.cloud_cover(fd.asset_path(item, "scl"), 0)
    out, config = tmp_path / "out", _config(data)
    assert _cli(capsys, "ingest", config, out)[0] == 0
    _fails_naming(capsys, "pivot", config, out, "B04")


# ---------------------------------------------------------------------------- errors


def test_empty_period_is_an_error(data, tmp_path, capsys, prefect_server):
    config = _config(data, period={"start": "2021-01-01", "end": "2021-03-31"})
    _fails_naming(capsys, "ingest", config, tmp_path / "o", "no items of 'sentinel-2-l2a'",
                  "2021-01-01")  # fmt: skip


def test_region_outside_the_grid_is_an_error(data, tmp_path, capsys, prefect_server):
    grid = {"extent": [500000, 5630000, 510000, 5640000]}
    config = _config(data, grid=grid, region={"bbox": [600000, 5630000, 600320, 5630320],
                                               "crs": "EPSG:32631"})  # fmt: skip
    _fails_naming(capsys, "ingest", config, tmp_path / "o", "extent")
    far = _config(data, region={"bbox": [400000, 5630000, 400320, 5630320], "crs": "EPSG:32631"})
    _fails_naming(capsys, "ingest", far, tmp_path / "p", "no items of")


def test_label_code_outside_the_nomenclature_is_an_error(data, tmp_path, capsys, prefect_server):
    labels = data / "labels" / "lc.tif"
    with rasterio.open(labels, "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        codes = dst.read(1)
        codes[5, 5] = 42
        dst.write(codes, 1)
    # found by the sample stage's label check, before any cube is needed
    _fails_naming(capsys, "sample", _config(data), tmp_path / "o", "42", str(labels))


def test_nomenclature_without_colours_is_an_error(data, tmp_path, capsys, prefect_server):
    import yaml

    path = data / "labels" / "nomenclature.yaml"
    doc = yaml.safe_load(path.read_text())
    for cls in doc["classes"]:
        cls.pop("color")
    path.write_text(yaml.safe_dump(doc))
    _fails_naming(capsys, "train", _config(data), tmp_path / "o", str(path), "color")


def test_config_with_an_unknown_key_is_refused(data, tmp_path, capsys):
    config = _config(data, ingest={"max_clouds": 20})
    error = _fails_naming(capsys, "ingest", config, tmp_path / "o", "ingest.max_clouds",
                          str(config))  # fmt: skip
    assert "Extra inputs are not permitted" in error and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["under a file", "read-only file system"])
def test_unwritable_output_is_an_error(where, data, tmp_path, capsys):
    if where == "under a file":
        (tmp_path / "plain").write_text("not a folder")
        out = tmp_path / "plain" / "out"
    else:
        out = Path("/proc/pivotmap-out")  # read-only for root too (chmod does not stop root)
    _fails_naming(capsys, "ingest", _config(data), out, str(out))


def test_read_only_output_folder_is_an_error(data, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (see the /proc case)")
        _fails_naming(capsys, "ingest", _config(data), out, str(out))
    finally:
        out.chmod(0o700)


@contextlib.contextmanager
def _tiny_tmpfs(folder: Path, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): 'full disk' not tested")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_output_location_is_an_error(data, tmp_path, capsys, prefect_server):
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    with _tiny_tmpfs(tmp_path / "full", "256k") as full:
        out = full / "out"
        error = _fails_naming(capsys, "ingest", _config(data), out, str(out))
        assert "No space left" in error
