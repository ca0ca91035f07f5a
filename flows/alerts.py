"""Alerts: a failed or crashed deployed run (scheduled or started by hand) POSTs a JSON to the
operator's webhook.

It is a Prefect automation on the server, so nothing in the flows has to be decorated and a run
whose process died is covered as soon as its state is Crashed: the trigger is the
`prefect.flow-run.Failed` / `prefect.flow-run.Crashed` event of a flow run that belongs to a
deployment (subflows, and runs started from the CLI, do not alert); the action calls a Prefect
`Webhook` block holding the URL (a secret: the API never shows it back). The body:

    {"source": "pivotmap", "flow": "map-production", "flow_run": "ultra-unicorn",
     "flow_run_id": "…", "deployment": "map-production", "state": "Failed",
     "message": "Flow run encountered an exception: …", "url": "http://…/runs/flow-run/…"}

`message` is Prefect's state message (the exception, at most 1000 characters): pivotmap's errors
name inputs, never credentials. Install (or update) it on the Prefect API of PREFECT_API_URL:

    PIVOTMAP_ALERT_WEBHOOK=https://hooks.example.org/T0/B0/xyz python -m pivotmap.flows.alerts install

(`pivotmap stack up` does it when PIVOTMAP_ALERT_WEBHOOK is set); `remove` deletes both.
"""

from __future__ import annotations

import os
import sys
from typing import cast
from urllib.parse import urlsplit
from uuid import UUID

WEBHOOK_ENV = "PIVOTMAP_ALERT_WEBHOOK"
AUTOMATION = "pivotmap-failed-deployed-runs"
BLOCK = "pivotmap-alert-webhook"
FAILED_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")

# Jinja (Prefect's sandbox, with its `tojson` filter) over the objects of the triggering event.
PAYLOAD = (
    '{"source": "pivotmap", '
    '"flow": {{ flow.name | tojson }}, '
    '"flow_run": {{ flow_run.name | tojson }}, '
    '"flow_run_id": "{{ flow_run.id }}", '
    '"deployment": {{ deployment.name | tojson }}, '
    '"state": {{ flow_run.state.name | tojson }}, '
    '"message": {{ (flow_run.state.message or "")[:1000] | tojson }}, '
    '"url": {{ flow_run | ui_url | tojson }}}'
)


class AlertError(ValueError):
    """The webhook URL is missing or not an http(s) URL."""


def webhook_url(value: str | None = None) -> str:
    """The webhook URL (`value`, else $PIVOTMAP_ALERT_WEBHOOK), checked; never logged."""
    url = (value if value is not None else os.environ.get(WEBHOOK_ENV, "")).strip()
    if not url:
        raise AlertError(f"{WEBHOOK_ENV} is not set: export the webhook URL that receives alerts")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AlertError(
            f"{WEBHOOK_ENV} is not an http(s) URL (scheme {parts.scheme or 'none'!r}): give the "
            "full address, e.g. https://hooks.example.org/…"
        )
    return url


def install(url: str | None = None, api_url: str | None = None) -> dict:
    """Create or replace the webhook block and the automation on the Prefect API (`api_url`,
    default PREFECT_API_URL). Returns their ids and the webhook's host (not the URL)."""
    from prefect.blocks.webhook import Webhook
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.types import SecretDict
    from pydantic import SecretStr

    url = webhook_url(url)
    settings = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(settings):
        from prefect.client.orchestration import get_client

        block = Webhook(
            method="POST", url=SecretStr(url),
            headers=SecretDict({"Content-Type": "application/json"}),
            allow_private_urls=True,  # an operator's own receiver is often on a private network
        )  # fmt: skip
        block_id = cast(UUID, block.save(BLOCK, overwrite=True))  # sync here: a UUID
        automation = AutomationCore(
            name=AUTOMATION,
            description="pivotmap: POST a JSON to the operator's webhook when a deployed run "
            "fails or crashes (flows/alerts.py)",
            trigger=EventTrigger(
                expect=set(FAILED_EVENTS),
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "deployment"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
        )
        with get_client(sync_client=True) as client:
            for old in client.read_automations_by_name(AUTOMATION):
                client.delete_automation(old.id)
            automation_id = client.create_automation(automation)
    return {
        "automation": AUTOMATION, "automation_id": str(automation_id), "block": BLOCK,
        "block_id": str(block_id), "webhook_host": urlsplit(url).hostname,
    }  # fmt: skip


def remove(api_url: str | None = None) -> dict:
    """Delete the automation and the webhook block (if there)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: api_url} if api_url else {}
    removed = []
    with temporary_settings(settings):
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            for old in client.read_automations_by_name(AUTOMATION):
                client.delete_automation(old.id)
                removed.append(AUTOMATION)
            try:
                block = client.read_block_document_by_name(BLOCK, "webhook")
            except ObjectNotFound:
                pass
            else:
                client.delete_block_document(block.id)
                removed.append(BLOCK)
    return {"removed": removed}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["install"], ["remove"]):
        print("usage: python -m pivotmap.flows.alerts install|remove", file=sys.stderr)
        return 2
    try:
        result = install() if argv == ["install"] else remove()
    except AlertError as exc:
        print(f"pivotmap alerts: error: {exc}", file=sys.stderr)
        return 1
    if argv == ["install"]:
        print(
            f"pivotmap alerts: automation {result['automation']} POSTs failed and crashed "
            f"deployed runs to {result['webhook_host']} (webhook block {result['block']})"
        )
    else:
        print(f"pivotmap alerts: removed {', '.join(result['removed']) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
