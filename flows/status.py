"""`pivotmap status`: recent flow runs from a Prefect API and the published map versions; and
rolling a published map back to an earlier version.

Status never starts a Prefect server: with no API URL (`--api` or PREFECT_API_URL) or an API
that does not answer, it says so and still lists the products.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from pivotmap.tasks import storage

HEALTH_TIMEOUT_S = 3.0


def status(
    api_url: str | None = None,
    out_dir: str | None = None,
    catalog: str | None = None,
    limit: int = 20,
) -> dict:
    """Flow runs that ran or run (newest first), then the scheduled ones (soonest first), and the
    products; each part says why it is empty when it is."""
    api_url = api_url or os.environ.get("PREFECT_API_URL") or None
    api = api_health(api_url)
    reachable = bool(api_url and api["reachable"])
    runs = recent_flow_runs(api_url, limit) if reachable and api_url else []
    scheduled = scheduled_flow_runs(api_url, limit) if reachable and api_url else []
    if catalog is None and out_dir is not None:
        catalog = storage.join(storage.normalise(out_dir), "products", "catalog.json")
    products = published_products(catalog) if catalog else {"message": "no --out or --catalog"}
    return {
        "ok": True, "api": api, "flow_runs": runs, "scheduled_runs": scheduled,
        "products": products,
    }  # fmt: skip


def api_health(api_url: str | None) -> dict:
    """Whether the Prefect API at `api_url` answers its health check."""
    if not api_url:
        return {
            "url": None,
            "reachable": False,
            "message": "no Prefect API configured: set PREFECT_API_URL or pass --api URL",
        }
    try:
        with urllib.request.urlopen(
            f"{api_url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S
        ) as answer:
            ok = answer.status == 200
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        return {
            "url": api_url,
            "reachable": False,
            "message": f"Prefect API at {api_url} is not reachable: {reason}",
        }
    return {"url": api_url, "reachable": ok, "message": "ok" if ok else "unhealthy"}


def recent_flow_runs(api_url: str, limit: int = 20) -> list[dict]:
    """The newest flow runs that started (or are about to), with flow, deployment, state and
    duration; runs still waiting for their scheduled time are `scheduled_flow_runs`."""
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    not_scheduled = FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])
    return _flow_runs(api_url, not_scheduled, FlowRunSort.START_TIME_DESC, limit)


def scheduled_flow_runs(api_url: str, limit: int = 20) -> list[dict]:
    """Flow runs waiting for their time (soonest first; a late one is one no worker took)."""
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    scheduled = FlowRunFilterStateType(any_=[StateType.SCHEDULED])
    return _flow_runs(api_url, scheduled, FlowRunSort.EXPECTED_START_TIME_ASC, limit)


def _flow_runs(api_url: str, state_type, sort, limit: int) -> list[dict]:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState

    runs_filter = FlowRunFilter(state=FlowRunFilterState(type=state_type))
    with SyncPrefectClient(api_url) as client:
        runs = client.read_flow_runs(flow_run_filter=runs_filter, sort=sort, limit=limit)
        flows = {f.id: f.name for f in client.read_flows(limit=200)}
        deployments = {d.id: d.name for d in client.read_deployments(limit=200)}
    return [
        {
            "flow": flows.get(r.flow_id, str(r.flow_id)),
            "name": r.name,
            "id": str(r.id),
            "deployment": deployments.get(r.deployment_id) if r.deployment_id else None,
            "state": r.state_type.value if r.state_type else None,
            "state_name": r.state_name,
            "start": _iso(r.start_time or r.expected_start_time),
            "duration_s": round(r.total_run_time.total_seconds(), 1),
            "subflow": r.parent_task_run_id is not None,
        }
        for r in runs
    ]


def _iso(moment) -> str | None:
    return moment.isoformat() if moment else None


def published_products(catalog_url: str) -> dict:
    """The version catalog.json serves now and, for a folder, every version kept beside it."""
    from pivotmap.tasks.publish import served_version

    try:
        root = json.loads(storage.read_bytes(storage.parse(catalog_url)).decode("utf-8"))
    except (OSError, ValueError, storage.StorageError) as exc:
        return {"catalog": catalog_url, "message": f"no published map at {catalog_url}: {exc}"}
    current = served_version(root)
    out = {"catalog": catalog_url, "title": root.get("title"), "current": current}
    if not storage.is_remote(catalog_url):
        out["versions"] = local_versions(storage.local_path(catalog_url).parent, current)
    return out


def local_versions(products_dir: Path, current: str | None = None) -> list[dict]:
    """Published versions in a products folder, newest first (by the collection's date)."""
    found = []
    for path in products_dir.glob("*/collection.json"):
        collection = json.loads(path.read_text())
        found.append(
            {
                "version": path.parent.name,
                "collection": collection["id"],
                "updated": path.stat().st_mtime,
                "current": path.parent.name == current,
                "items": sum(1 for link in collection["links"] if link["rel"] == "item"),
            }
        )
    found.sort(key=lambda v: v["updated"], reverse=True)
    for v in found:
        v.pop("updated")
    return found


def rollback(
    products_dir: str | Path, version: str, target: str | None = None, stac_api: str | None = None
) -> dict:
    """Point catalog.json back at a version still kept in `products_dir` (atomic switch); with
    `target` (folder or s3://) mirror that switch too, catalogue last; with `stac_api` (a pgstac
    database, as `publish.stac_api`) make the API serve it under the collection id too."""
    from pivotmap.tasks.publish import PublishError, write_root_catalog

    products_dir = Path(products_dir).resolve()
    collection_path = products_dir / version / "collection.json"
    if not collection_path.is_file():
        kept = [v["version"] for v in local_versions(products_dir)]
        raise PublishError(f"no published version {version!r} in {products_dir} (kept: {kept})")
    collection = json.loads(collection_path.read_text())
    before = published_products(str(products_dir / "catalog.json")).get("current")
    write_root_catalog(products_dir, version, collection["id"], collection["title"])
    out = {"ok": True, "catalog": str(products_dir / "catalog.json"), "previous": before}
    out["current"] = version
    if target:
        from pivotmap.tasks.publish import mirror_published

        out["mirror"] = mirror_published(products_dir, version, target)
    if stac_api:
        from pivotmap.config import PublishConfig
        from pivotmap.tasks.pgstac_server import publish_to_stac_api

        PublishConfig(stac_api=stac_api)  # the same check as the config's: no password in it
        out["stac_api"] = publish_to_stac_api(stac_api, products_dir)
    return out


def status_text(summary: dict) -> str:
    """The status for people: recent flow runs, then scheduled ones, then the product versions."""
    api = summary["api"]
    lines = [f"Prefect API: {api['url'] or '-'} ({api['message']})"]
    if api["reachable"]:
        lines.append(f"Recent flow runs ({len(summary['flow_runs'])}, newest first):")
        lines += [_run_line(r) for r in summary["flow_runs"]] or ["  none"]
        scheduled = summary.get("scheduled_runs", [])
        lines.append(f"Scheduled flow runs ({len(scheduled)}, soonest first):")
        lines += [_run_line(r, duration=False) for r in scheduled] or ["  none"]
    products = summary["products"]
    lines.append(f"Products: {products.get('catalog', '-')}")
    if "message" in products:
        lines.append(f"  {products['message']}")
    for v in products.get("versions", []):
        mark = "*" if v["current"] else " "
        lines.append(f"  {mark} {v['version']} ({v['items']} tiles)")
    if products.get("current") and "versions" not in products:
        lines.append(f"  * {products['current']}")
    return "\n".join(lines)


def _run_line(run: dict, duration: bool = True) -> str:
    where = f" [{run['deployment']}]" if run["deployment"] else ""
    state = run.get("state_name") or run["state"] or "-"
    took = f" {run['duration_s']} s" if duration else ""
    return f"  {run['start'] or '-':32} {state:10} {run['flow']}/{run['name']}{where}{took}"


# Stages that mark each finished tile under OUT/state/<stage>/ (a re-run skips those tiles).
TILE_STAGES = ("ingest-s2", "ingest-s1", "pivot", "sample", "predict")


def kept_tiles(config, out_dir: str) -> dict[str, int]:
    """Finished tiles per stage in the run folder `out_dir`, from its stage markers."""
    from pivotmap.tasks.workspace import Workspace

    ws = Workspace(root=storage.normalise(str(out_dir)), config=config)
    counts = {s: len(storage.list_files(ws.url("state", s), "*.json")) for s in TILE_STAGES}
    return {stage: n for stage, n in counts.items() if n}


def resume_note(config, out_dir: str) -> str:
    """One sentence for an interrupted run: what a re-run of the same command keeps."""
    from pivotmap.tasks.workspace import Workspace

    root = storage.normalise(str(out_dir))
    kept = kept_tiles(config, root)
    if not kept:
        return f"no tile was finished in {root}: a re-run starts from the beginning"
    total = len(Workspace(root=root, config=config).tiles())
    done = ", ".join(f"{stage} {n}/{total} tiles" for stage, n in kept.items())
    return (
        f"a re-run of the same command resumes from {root}, reusing the finished tiles "
        f"({done}); unfinished stages (and train, which always retrains) run again"
    )
