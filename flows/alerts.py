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

Crash detection: a flow run whose process died with its worker (a node lost, `kill -9`) has
nobody left to report it, and stays Running. Every flow-run process sends a
`prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's
minimum, 30; default 180); the automation `pivotmap-crash-silent-runs` expects, for each flow
run, another flow-run event (heartbeat or final state) within `within` seconds (default 90,
three heartbeats) of the last heartbeat, and otherwise sets the run Crashed (which also alerts
through the automation above, and frees the deployment's concurrency slot for a re-run). Every
worker (and every process that runs flows) on that server must send heartbeats more often than
`within`: `pivotmap stack up` sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 for its workers and in
stack.env, and installs the automation; on another server:

    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 prefect worker start --pool gpu     # every worker
    python -m pivotmap.flows.alerts crash-detection [--within 90]           # once
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import cast
from urllib.parse import urlsplit
from uuid import UUID

WEBHOOK_ENV = "PIVOTMAP_ALERT_WEBHOOK"
AUTOMATION = "pivotmap-failed-deployed-runs"
BLOCK = "pivotmap-alert-webhook"
FAILED_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
HEARTBEAT_SECONDS = 30  # Prefect's minimum (settings.flows.heartbeat_frequency, ge=30)
CRASH_AUTOMATION = "pivotmap-crash-silent-runs"
CRASH_AFTER_SECONDS = 90  # three missed heartbeats
CRASH_MESSAGE = (
    "no heartbeat from the flow run's process for {within} s: its process or node died "
    "(marked Crashed by the pivotmap-crash-silent-runs automation); re-run the deployment "
    "with the same parameters to resume"
)

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
            automation_id = _replace_automation(client, automation)
    return {
        "automation": AUTOMATION, "automation_id": str(automation_id), "block": BLOCK,
        "block_id": str(block_id), "webhook_host": urlsplit(url).hostname,
    }  # fmt: skip


def _replace_automation(client, automation) -> str:
    for old in client.read_automations_by_name(automation.name):
        client.delete_automation(old.id)
    return str(client.create_automation(automation))


def crash_detection_automation(within: float = CRASH_AFTER_SECONDS):
    """The proactive automation that sets a flow run Crashed when its heartbeats stop."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    if within < 2 * HEARTBEAT_SECONDS:
        raise AlertError(
            f"crash detection within {within:g} s: give at least {2 * HEARTBEAT_SECONDS} s (two "
            f"heartbeats of {HEARTBEAT_SECONDS} s, Prefect's shortest interval)"
        )
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description="pivotmap: set a flow run Crashed when its process sent no heartbeat for "
        f"{within:g} s (flows/alerts.py; workers need {HEARTBEAT_ENV}={HEARTBEAT_SECONDS})",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},  # the next heartbeat, or a state (final or not)
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED, name="Crashed",
                message=CRASH_MESSAGE.format(within=f"{within:g}"),
                force=False,  # through the orchestration rules, like a worker reporting it
            )
        ],
    )  # fmt: skip


def install_crash_detection(
    api_url: str | None = None, within: float = CRASH_AFTER_SECONDS
) -> dict:
    """Create or replace the crash-detection automation on the Prefect API (`api_url`, default
    PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    automation = crash_detection_automation(within)
    settings = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(settings):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            automation_id = _replace_automation(client, automation)
    return {"automation": CRASH_AUTOMATION, "automation_id": automation_id,
            "within_s": within, "heartbeat_s": HEARTBEAT_SECONDS}  # fmt: skip


def remove(api_url: str | None = None) -> dict:
    """Delete the alert automation, the webhook block and the crash detection (if there)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: api_url} if api_url else {}
    removed = []
    with temporary_settings(settings):
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            for name in (AUTOMATION, CRASH_AUTOMATION):
                for old in client.read_automations_by_name(name):
                    client.delete_automation(old.id)
                    removed.append(name)
            try:
                block = client.read_block_document_by_name(BLOCK, "webhook")
            except ObjectNotFound:
                pass
            else:
                client.delete_block_document(block.id)
                removed.append(BLOCK)
    return {"removed": removed}


def main(argv: list[str] | None = None) -> int:
    """`python -m pivotmap.flows.alerts install|crash-detection [--within S]|remove`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pivotmap.flows.alerts")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help=f"POST failed/crashed deployed runs to ${WEBHOOK_ENV}")
    crash = sub.add_parser("crash-detection", help="set runs whose heartbeats stop Crashed")
    crash.add_argument("--within", type=float, default=CRASH_AFTER_SECONDS, metavar="SECONDS",
                       help="seconds without a heartbeat (default %(default)g)")  # fmt: skip
    sub.add_parser("remove", help="delete both automations and the webhook block")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    try:
        if args.command == "install":
            result = install()
            print(
                f"pivotmap alerts: automation {result['automation']} POSTs failed and crashed "
                f"deployed runs to {result['webhook_host']} (webhook block {result['block']})"
            )
        elif args.command == "crash-detection":
            result = install_crash_detection(within=args.within)
            print(
                f"pivotmap alerts: automation {result['automation']} sets a flow run Crashed "
                f"after {result['within_s']:g} s without a heartbeat; start every worker with "
                f"{HEARTBEAT_ENV}={HEARTBEAT_SECONDS}"
            )
        else:
            result = remove()
            print(f"pivotmap alerts: removed {', '.join(result['removed']) or 'nothing'}")
    except AlertError as exc:
        print(f"pivotmap alerts: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
