"""Publishing to S3 (moto server on 127.0.0.1) and to folders, and downloading maps back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from pivotmap.flows.cli import main
from pivotmap.tasks import storage
from pivotmap.tasks.download import DownloadError, download_map, find_items, parse_bbox
from pivotmap.tasks.publish import mirror_published, publish_products
from tests.test_publish import PUBLISH_ARGS, make_maps, nomenclature, provenance  # noqa: F401 - fixtures

ALL = (2.99, 50.8, 3.02, 50.83)  # lon/lat box around both test tiles (EPSG:32631, x 500000..500640)


@pytest.fixture
def published_twice(tmp_path, nomenclature, provenance):
    out = tmp_path / "products"
    v1, v2 = make_maps(seed=0), make_maps(seed=1)
    publish_products(v1, nomenclature, provenance, out, version="v1", **PUBLISH_ARGS)
    return out, v1, v2


def _mosaic(maps) -> np.ndarray:
    return np.concatenate([m.classes for m in maps], axis=1)


def _catalog_version(bucket: str) -> str:
    catalog = json.loads(storage.read_bytes(storage.parse(f"s3://{bucket}/maps/catalog.json")))
    (child,) = [link["href"] for link in catalog["links"] if link["rel"] == "child"]
    return child.split("/")[-2]


def test_publish_to_s3_and_download_back(published_twice, s3_bucket, tmp_path):
    out, v1, _ = published_twice
    stats = mirror_published(out, "v1", f"s3://{s3_bucket}/maps")
    assert stats["uploaded"] > 6 and stats["unchanged"] == 0
    again = mirror_published(out, "v1", f"s3://{s3_bucket}/maps")
    assert again["uploaded"] == 0 and again["unchanged"] == stats["uploaded"]
    items = find_items(f"s3://{s3_bucket}/maps/catalog.json", ALL)
    assert len(items) == 2
    result = download_map(items, ALL, tmp_path / "map.tif")
    with rasterio.open(result["out"]) as src:
        data = src.read(1)
        assert src.colormap(1)[1][:3] == (0, 100, 0)
        row, col = src.index(500000 + 5, 5630320 - 5)  # centre of the map's upper-left pixel
    # The box is larger than the map: the two tiles sit inside it, surrounded by nodata.
    np.testing.assert_array_equal(data[row : row + 32, col : col + 64], _mosaic(v1))
    assert (data != 255).sum() == (_mosaic(v1) != 255).sum()


def test_interrupted_upload_keeps_the_previous_version_served(
    published_twice, s3_bucket, nomenclature, provenance, monkeypatch
):
    out, _, v2 = published_twice
    mirror_published(out, "v1", f"s3://{s3_bucket}/maps")
    publish_products(v2, nomenclature, provenance, out, version="v2", **PUBLISH_ARGS)
    sent = []
    real_put = storage.put_file

    def flaky_put(client, path, bucket, key, digest=None):
        if len(sent) == 3:
            raise storage.StorageError("connection reset (injected)")
        sent.append(key)
        real_put(client, path, bucket, key, digest)

    monkeypatch.setattr(storage, "put_file", flaky_put)
    with pytest.raises(storage.StorageError, match="injected"):
        mirror_published(out, "v2", f"s3://{s3_bucket}/maps")
    assert _catalog_version(s3_bucket) == "v1"
    monkeypatch.setattr(storage, "put_file", real_put)
    mirror_published(out, "v2", f"s3://{s3_bucket}/maps")
    assert _catalog_version(s3_bucket) == "v2"


def test_folder_target_and_cli_download(published_twice, tmp_path, capsys):
    out, v1, _ = published_twice
    target = tmp_path / "www"
    mirror_published(out, "v1", str(target))
    assert (target / "v1" / "collection.json").is_file() and (target / "catalog.json").is_file()
    code = main(["download", "--catalog", str(target / "catalog.json"), "--bbox", ",".join(map(str, ALL)),
                 "--out", str(tmp_path / "cli.tif"), "--json"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and len(summary["items"]) == 2
    with rasterio.open(tmp_path / "cli.tif") as src:
        assert set(np.unique(src.read(1))) <= {1, 2, 3, 255}


def test_bad_requests_are_named(published_twice, tmp_path):
    out, _, _ = published_twice
    with pytest.raises(DownloadError, match="not a valid lon/lat box"):
        parse_bbox("3,51,2,50")
    with pytest.raises(DownloadError, match="no map tile .* intersects"):
        find_items(str(out / "catalog.json"), (10.0, 45.0, 10.1, 45.1))
    with pytest.raises(DownloadError, match="cannot read catalogue"):
        find_items(str(tmp_path / "none" / "catalog.json"), ALL)


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b"])
def test_keys_cannot_escape_their_prefix(name):
    with pytest.raises(storage.StorageError, match="escape"):
        storage.parse("s3://bucket/maps").join(name)
