"""Publishing killed between files (kill -9 semantics: the process dies at once, no cleanup):
readers of the local folder, of a mirror folder and of S3 (moto) keep getting the whole previous
version, never a partial catalogue, and a re-run completes the new version.

tests/test_publish.py and tests/test_s3_publish.py cover a Python exception at the same points;
here the publishing process itself dies (`os._exit` at the chosen write), as a crash or
`kill -9` would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pivotmap.tasks.download import download_map, find_items
from pivotmap.tasks.publish import mirror_published, publish_products
from tests import faults_data as fd
from tests.test_publish import PUBLISH_ARGS, make_maps

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[1]
ALL = (2.99, 50.8, 3.02, 50.83)  # lon/lat box around both tiles
CRASH = """
import os, shutil, sys
from pathlib import Path
from pivotmap.tasks import cog, publish, storage
from tests import faults_data as fd
from tests.test_publish import PUBLISH_ARGS, make_maps

mode, out, target, after = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
calls = []

def dying(real):
    def write(*args, **kwargs):
        calls.append(args)
        if len(calls) > after:
            os._exit(137)  # like kill -9 between two files: no finally, no cleanup
        return real(*args, **kwargs)
    return write

if mode == "staging":
    cog.write_confidence_cog = dying(cog.write_confidence_cog)
elif mode == "switch":
    publish.write_root_catalog = dying(publish.write_root_catalog)
elif mode == "folder":
    shutil.copyfile = dying(shutil.copyfile)
else:
    storage.put_file = dying(storage.put_file)
if mode in ("staging", "switch"):
    nomenclature, provenance = fd.publish_inputs()
    publish.publish_products(make_maps(seed=1), nomenclature, provenance, out, version="v2",
                             **PUBLISH_ARGS)
else:
    publish.mirror_published(out, "v2", target)
sys.exit(3)  # not reached when the crash point is hit
"""


def _crash(mode: str, out: Path, target: str, after: int) -> int:
    return subprocess.run([sys.executable, "-c", CRASH, mode, str(out), target, str(after)],
                          cwd=REPO, capture_output=True, timeout=300).returncode  # fmt: skip


def _served(catalog: str) -> tuple[str, np.ndarray]:
    """What a reader gets: the catalogue's current version and the downloaded class mosaic."""
    items = find_items(catalog, ALL)
    versions = {Path(i.get_self_href()).parent.parent.name for i in items}
    assert len(items) == 2 and len(versions) == 1, versions
    out = Path(f"/tmp/{abs(hash(catalog))}-read.tif")
    try:
        download_map(items, ALL, out)
        with rasterio.open(out) as src:
            return versions.pop(), src.read(1)
    finally:
        out.unlink(missing_ok=True)


@pytest.fixture
def products(tmp_path):
    """v1 published (the version readers have); the maps of v1 and v2."""
    nomenclature, provenance = fd.publish_inputs()
    out = tmp_path / "products"
    publish_products(make_maps(seed=0), nomenclature, provenance, out, version="v1",
                     **PUBLISH_ARGS)  # fmt: skip
    return out, nomenclature, provenance


@pytest.mark.parametrize(("mode", "after"), [("staging", 1), ("switch", 0)])
def test_local_publish_killed_keeps_the_previous_version(products, mode, after):
    out, nomenclature, provenance = products
    catalog = str(out / "catalog.json")
    before = _served(catalog)
    catalog_bytes = (out / "catalog.json").read_bytes()
    assert _crash(mode, out, "-", after) == 137
    assert (out / "catalog.json").read_bytes() == catalog_bytes
    version, mosaic = _served(catalog)
    assert version == "v1" and np.array_equal(mosaic, before[1])
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    # killed while staging: no v2 folder at all; killed before the switch: v2 whole but unlinked
    assert visible == (
        ["catalog.json", "v1"] if mode == "staging" else ["catalog.json", "v1", "v2"]
    )
    publish_products(make_maps(seed=1), nomenclature, provenance, out, version="v2",
                     **PUBLISH_ARGS)  # fmt: skip
    version, mosaic = _served(catalog)
    assert version == "v2" and not np.array_equal(mosaic, before[1])
    assert not list(out.glob(".staging-*"))  # the killed writer's leftovers are swept


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_mirror_killed_between_files_keeps_the_previous_version(products, where, tmp_path,
                                                                 request):  # fmt: skip
    out, nomenclature, provenance = products
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        target = f"s3://{bucket}/maps"
    else:
        target = str(tmp_path / "www")
    mirror_published(out, "v1", target)
    publish_products(make_maps(seed=1), nomenclature, provenance, out, version="v2",
                     **PUBLISH_ARGS)  # fmt: skip
    catalog = f"{target}/catalog.json"
    before = _served(catalog)
    assert _crash(where, out, target, 3) == 137  # died after 3 of the version's files
    version, mosaic = _served(catalog)
    assert version == "v1" and np.array_equal(mosaic, before[1])
    if where == "folder":
        assert sorted(p.name for p in Path(target).iterdir() if not p.name.startswith(".")) == [
            "catalog.json", "v1"]  # fmt: skip
    else:
        assert json.loads(fd_read(target + "/catalog.json"))["links"]  # whole JSON, v1 still
    mirror_published(out, "v2", target)
    version, mosaic = _served(catalog)
    assert version == "v2" and not np.array_equal(mosaic, before[1])
    if where == "folder":
        assert not list(Path(target).glob(".staging-*"))  # the killed writer's leftovers


def fd_read(url: str) -> bytes:
    from pivotmap.tasks import storage

    return storage.read_bytes(storage.parse(url))
