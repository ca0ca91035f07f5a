"""The alert automation's parts that need no server: the webhook URL checks, and the payload
template rendered by Prefect's own template environment into valid JSON (quotes, newlines and
HTML in a state message included). The automation on a real Prefect server, called by a failing
deployed run, is in tests/test_stack.py."""

from __future__ import annotations

import json
from uuid import uuid4

import pytest

from pivotmap.flows import alerts


def test_the_webhook_url_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(alerts.WEBHOOK_ENV, " https://hooks.example.org/T0/secret ")
    assert alerts.webhook_url() == "https://hooks.example.org/T0/secret"
    monkeypatch.delenv(alerts.WEBHOOK_ENV)
    with pytest.raises(alerts.AlertError, match="PIVOTMAP_ALERT_WEBHOOK is not set"):
        alerts.webhook_url()
    with pytest.raises(alerts.AlertError, match="not an http.s. URL .scheme 'ftp'"):
        alerts.webhook_url("ftp://example.org/x")


def test_install_without_a_webhook_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    assert alerts.main(["install"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "pivotmap alerts: error: PIVOTMAP_ALERT_WEBHOOK is not set: export the webhook URL "
        "that receives alerts"
    ]
    assert alerts.main(["nonsense"]) == 2


def test_the_payload_renders_to_json_with_any_message():
    from prefect.server.events.actions import CallWebhook
    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.schemas.core import Deployment, Flow, FlowRun
    from prefect.server.schemas.states import State, StateType
    from prefect.server.utilities.user_templates import (
        _sync_template_environment,
        register_user_template_filters,
    )

    CallWebhook(block_document_id=uuid4(), payload=alerts.PAYLOAD)  # the server accepts it
    register_user_template_filters(all_filters)
    message = 'Flow run encountered an exception: ValueError: "bad" <input>\n' + "x" * 2000
    state = State(type=StateType.FAILED, name="Failed", message=message)
    flow = Flow(name="map-production")
    run = FlowRun(flow_id=flow.id, name="ultra-unicorn", state=state)
    deployment = Deployment(name="map-production", flow_id=flow.id)
    body = _sync_template_environment.from_string(alerts.PAYLOAD).render(
        flow=flow, flow_run=run, deployment=deployment
    )
    payload = json.loads(body)
    assert payload == {
        "source": "pivotmap", "flow": "map-production", "flow_run": "ultra-unicorn",
        "flow_run_id": str(run.id), "deployment": "map-production", "state": "Failed",
        "message": message[:1000], "url": payload["url"],
    }  # fmt: skip


def test_the_crash_detection_sets_silent_runs_crashed():
    from datetime import timedelta

    from prefect.server.events.schemas.automations import AutomationCore as ServerAutomation

    automation = alerts.crash_detection_automation()
    # what the server stores: one bucket per flow run, opened by a heartbeat, closed by any
    # flow-run event (the next heartbeat or a state) within 90 s, else the run is set Crashed
    server = ServerAutomation.model_validate(automation.model_dump(mode="json"))
    trigger = server.trigger
    assert trigger.posture == "Proactive" and trigger.threshold == 1
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.*"}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.within == timedelta(seconds=alerts.CRASH_AFTER_SECONDS)
    (action,) = server.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    assert "no heartbeat from the flow run's process for 90 s" in action.message
    # the heartbeat frequency the workers get is one Prefect accepts
    from prefect.settings.models.flows import FlowsSettings

    frequency = FlowsSettings(heartbeat_frequency=alerts.HEARTBEAT_SECONDS).heartbeat_frequency
    assert frequency == alerts.HEARTBEAT_SECONDS
    assert alerts.HEARTBEAT_ENV == "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"


def test_a_window_shorter_than_two_heartbeats_is_refused(capsys):
    with pytest.raises(alerts.AlertError, match="within 45 s: give at least 60 s"):
        alerts.crash_detection_automation(45)
    assert alerts.main(["crash-detection", "--within", "30"]) == 1
    assert capsys.readouterr().err.strip() == (
        "pivotmap alerts: error: crash detection within 30 s: give at least 60 s (two "
        "heartbeats of 30 s, Prefect's shortest interval)"
    )
