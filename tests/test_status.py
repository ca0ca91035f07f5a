"""`pivotmap status` (flow runs from a real Prefect API, published versions) and rolling a
published map back to an earlier version, locally and on an S3 mirror."""

from __future__ import annotations

import json
import socket

import pytest

from pivotmap.flows.cli import main
from pivotmap.flows.status import rollback, status
from pivotmap.tasks.download import find_items
from pivotmap.tasks.publish import PublishError, mirror_published, publish_products
from tests.test_publish import PUBLISH_ARGS, make_maps, nomenclature, provenance  # noqa: F401

ALL = (2.99, 50.8, 3.02, 50.83)  # lon/lat box around both test tiles


@pytest.fixture
def two_versions(tmp_path, nomenclature, provenance):
    """A run folder whose products/ holds v1 and v2, catalog.json serving v2."""
    products = tmp_path / "products"
    publish_products(make_maps(0), nomenclature, provenance, products, version="v1", **PUBLISH_ARGS)
    publish_products(make_maps(1), nomenclature, provenance, products, version="v2", **PUBLISH_ARGS)
    return tmp_path


def _current(catalog_path) -> str:
    links = json.loads(catalog_path.read_text())["links"]
    return next(link["href"] for link in links if link["rel"] == "child").split("/")[-2]


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: nothing listens there


def test_status_without_an_api_still_lists_the_products(two_versions, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = status(out_dir=str(two_versions))
    assert result["api"]["reachable"] is False and "PREFECT_API_URL" in result["api"]["message"]
    assert result["flow_runs"] == []
    products = result["products"]
    assert products["current"] == "v2"
    assert [(v["version"], v["current"], v["items"]) for v in products["versions"]] == [
        ("v2", True, 2),
        ("v1", False, 2),
    ]


def test_status_cli_names_an_unreachable_api(two_versions, capsys):
    url = f"http://127.0.0.1:{_dead_port()}/api"
    assert main(["status", "--api", url, "--out", str(two_versions), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["api"] == {
        "url": url,
        "reachable": False,
        "message": result["api"]["message"],
    } and result["api"]["message"].startswith(f"Prefect API at {url} is not reachable")
    assert "* v2 (2 tiles)" in captured.err


def test_status_of_a_missing_catalog_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    products = status(catalog=str(tmp_path / "nothing" / "catalog.json"))["products"]
    assert products["message"].startswith("no published map at")


def test_rollback_switches_the_catalog_back(two_versions):
    products = two_versions / "products"
    result = rollback(products, "v1")
    assert (result["previous"], result["current"]) == ("v2", "v1")
    assert _current(products / "catalog.json") == "v1"
    items = find_items(str(products / "catalog.json"), ALL)
    assert {i.properties["pivotmap:model_version"] for i in items} == {"7"}
    assert all("/v1/" in i.assets["class"].get_absolute_href() for i in items)
    assert status(out_dir=str(two_versions))["products"]["current"] == "v1"
    with pytest.raises(PublishError, match=r"no published version 'v9'.*'v1'"):
        rollback(products, "v9")


def test_rollback_cli(two_versions, capsys):
    assert main(["rollback", "v1", "--out", str(two_versions), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["previous"], result["current"]) == ("v2", "v1")
    assert _current(two_versions / "products" / "catalog.json") == "v1"
    assert main(["rollback", "v9", "--out", str(two_versions)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pivotmap: error: PublishError: no published version 'v9'")
    assert _current(two_versions / "products" / "catalog.json") == "v1"  # left as it was


def test_rollback_of_an_s3_mirror(two_versions, s3_bucket):
    products, target = two_versions / "products", f"s3://{s3_bucket}/maps"
    mirror_published(products, "v1", target)
    mirror_published(products, "v2", target)
    result = rollback(products, "v1", target)
    assert result["mirror"]["uploaded"] == 0  # v1 is there already: only catalog.json moves
    served = status(catalog=f"{target}/catalog.json")["products"]
    assert served["current"] == "v1" and "versions" not in served


@pytest.mark.deploy
@pytest.mark.slow
def test_status_lists_flow_runs_of_a_real_server(prefect_api_server, two_versions):
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, _ = prefect_api_server

    @flow(name="status-probe")
    def probe() -> int:
        return 1

    from prefect.logging.handlers import APILogWorker

    with temporary_settings({PREFECT_API_URL: url}):
        assert probe() == 1
        APILogWorker.drain_all(timeout=5)  # send its logs while this server is up
    result = status(api_url=url, out_dir=str(two_versions))
    assert result["api"]["reachable"]
    probes = [r for r in result["flow_runs"] if r["flow"] == "status-probe"]
    assert probes and probes[0]["state"] == "COMPLETED" and probes[0]["deployment"] is None


def test_resume_note_counts_the_finished_tiles_a_rerun_keeps(tmp_path):
    from pivotmap.config import RunConfig
    from pivotmap.flows.demo import demo_config_dict
    from pivotmap.flows.status import resume_note
    from pivotmap.tasks.workspace import Workspace

    config = RunConfig.model_validate(demo_config_dict(str(tmp_path / "data")))
    out = tmp_path / "out"
    assert "no tile was finished" in resume_note(config, str(out))
    ws = Workspace.open(config, out)
    tiles = ws.tiles()
    for tile in tiles:
        ws.mark_done("pivot", tile.id, "k", {})
    ws.mark_done("predict", tiles[0].id, "k", {})
    note = resume_note(config, str(out))
    assert f"pivot {len(tiles)}/{len(tiles)} tiles" in note
    assert f"predict 1/{len(tiles)} tiles" in note and "ingest" not in note


def test_download_rollback_and_status_say_what_they_did(two_versions, tmp_path, capsys):
    url = f"http://127.0.0.1:{_dead_port()}/api"
    catalog = two_versions / "products" / "catalog.json"
    bbox = ",".join(map(str, ALL))
    out = tmp_path / "map.tif"

    assert main(["download", "--catalog", str(catalog), "--bbox", bbox, "--out", str(out)]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pivotmap: downloaded 2 map tiles (class, ")
    assert f"into {out}: a COG of " in line and "model version 7" in line
    assert " kB" in line or " bytes" in line

    assert main(["rollback", "v1", "--out", str(two_versions)]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"pivotmap: {catalog} now serves v1 (was v2)"

    assert main(["status", "--api", url, "--out", str(two_versions)]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "pivotmap: 0 flow runs listed; published map served: v1"


@pytest.mark.parametrize("stage", ["train", "publish"])
def test_force_is_refused_where_there_is_nothing_to_redo(stage, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("name: x\n")  # never read: the flag is refused first
    code = main([stage, "--config", str(config), "--out", str(tmp_path / "o"), "--force"])
    err = capsys.readouterr().err
    assert code == 1 and f"--force does nothing for `{stage}`" in err and "drop --force" in err
    assert not (tmp_path / "o").exists()


def test_status_text_lists_recent_runs_first_and_scheduled_runs_below():
    from pivotmap.flows.status import status_text

    def run(name: str, state: str, start: str, deployment: str | None = None) -> dict:
        return {"flow": "map-production", "name": name, "id": name, "deployment": deployment,
                "state": state, "state_name": state.title(), "start": start, "duration_s": 1.0,
                "subflow": False}  # fmt: skip

    summary = {
        "api": {"url": "http://127.0.0.1:1/api", "reachable": True, "message": "ok"},
        "flow_runs": [run("ran", "COMPLETED", "2026-01-01T02:00:00+00:00", "map-production")],
        "scheduled_runs": [run("next", "SCHEDULED", "2026-04-01T02:00:00+00:00", "map-production")],
        "products": {"message": "no --out or --catalog"},
    }
    lines = status_text(summary).splitlines()
    recent, scheduled = (
        lines.index("Recent flow runs (1, newest first):"),
        next(i for i, line in enumerate(lines) if line.startswith("Scheduled flow runs (1")),
    )
    assert recent < scheduled
    assert "map-production/ran [map-production] 1.0 s" in lines[recent + 1]
    assert (
        "2026-04-01T02:00:00+00:00" in lines[scheduled + 1] and "Scheduled" in lines[scheduled + 1]
    )
    empty = status_text({**summary, "flow_runs": [], "scheduled_runs": []})
    assert "Recent flow runs (0, newest first):\n  none\nScheduled flow runs (0" in empty
