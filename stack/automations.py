"""medxfer's Prefect automations, defined here and created (or replaced, by name) with one
command against the Prefect API in PREFECT_API_URL (PREFECT_API_AUTH_STRING for its auth):

    MEDXFER_ALERT_WEBHOOK_URL=https://hooks.example.org/medxfer .venv/bin/python -m stack.automations

- "medxfer: flow run failed": a flow run of a medxfer deployment (tag `medxfer`) that fails
  or crashes sends a notification naming the deployment, the flow run, the stage it stopped
  in and the reason (the state message). No patient data: the flows keep identifiers out of
  state messages, and the message carries no parameters, file names or logs.
- "medxfer: model promoted": a `medxfer.model.promoted` event (model, version, metric) sends a
  notification, and
- "medxfer: rescore on promotion of <model>": each scoring deployment (flow `score-studies`)
  runs again when the model its config names gets a new champion.

The notification goes through the block `custom-webhook/medxfer-alerts`, made from
MEDXFER_ALERT_WEBHOOK_URL (JSON {"subject", "body"}; MEDXFER_ALERT_WEBHOOK_TOKEN, if set, is
sent as a bearer token and kept as a block secret). A site that alerts by mail, Teams or
Slack creates an Apprise block of its own in the UI and names it in MEDXFER_ALERT_BLOCK
(e.g. `slack-webhook/ops`); the webhook variables are then not needed.
"""

from __future__ import annotations

import os
import sys
from uuid import UUID

from prefect import get_client
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.events.actions import RunDeployment, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from configs import load_config
from flows.events import MODEL_RESOURCE_PREFIX, PROMOTED
from flows.stages import STAGE_LABEL
from stack.settings import REPO

WEBHOOK_URL_ENV, WEBHOOK_TOKEN_ENV, BLOCK_ENV = ("MEDXFER_ALERT_WEBHOOK_URL", "MEDXFER_ALERT_WEBHOOK_TOKEN",
                                                 "MEDXFER_ALERT_BLOCK")
WEBHOOK_BLOCK = "medxfer-alerts"
DEPLOYMENT_TAG = "medxfer"  # prefect.yaml tags every medxfer deployment with it
SCORING_FLOW = "score-studies"

FAILED_SUBJECT = "medxfer: {{ flow_run.name }} {{ flow_run.state.name }} in stage " \
                 "{{ flow_run.labels.get('" + STAGE_LABEL + "', 'none') }}"
FAILED_BODY = """\
Deployment: {{ flow.name }}/{{ deployment.name if deployment else 'none (not run from a deployment)' }}
Flow run: {{ flow_run.name }} ({{ flow_run.id }}), attempt {{ flow_run.run_count }}
State: {{ flow_run.state.name }}
Stage: {{ flow_run.labels.get('""" + STAGE_LABEL + """', 'none (it stopped before its first stage)') }}
Reason: {{ flow_run.state.message | truncate(1000) }}
Open: {{ flow_run | ui_url }}"""
PROMOTED_SUBJECT = "medxfer: {{ event.payload.model }} v{{ event.payload.version }} is the new champion"
PROMOTED_BODY = """\
Model: {{ event.payload.model }} v{{ event.payload.version }}
Test {{ event.payload.metric }}: {{ event.payload.value }}
Why: {{ event.payload.reason }}"""


def notification_block_id() -> UUID:
    """The block named in MEDXFER_ALERT_BLOCK, else the webhook block, saved from the environment."""
    named = os.environ.get(BLOCK_ENV)
    if named:
        return Block.load(named)._block_document_id
    url = os.environ.get(WEBHOOK_URL_ENV)
    if not url:
        raise SystemExit(f"set {WEBHOOK_URL_ENV} (the webhook that receives alerts) or {BLOCK_ENV}")
    token = os.environ.get(WEBHOOK_TOKEN_ENV)
    block = CustomWebhookNotificationBlock(
        name=WEBHOOK_BLOCK, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"},
        headers={"Authorization": "Bearer {{token}}"} if token else None,
        secrets={"token": token} if token else {})
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def definitions(block_id: UUID, scoring: dict[UUID, str]) -> list[AutomationCore]:
    """The automations; `scoring` maps each scoring deployment's id to the model it scores with."""
    failed = AutomationCore(
        name="medxfer: flow run failed",
        description="A medxfer flow run failed or crashed: who, where it stopped and why.",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                             match={"prefect.resource.id": "prefect.flow-run.*"},
                             match_related={"prefect.resource.role": "tag",
                                            "prefect.resource.id": f"prefect.tag.{DEPLOYMENT_TAG}"},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY)])
    promoted = AutomationCore(
        name="medxfer: model promoted",
        description="A registered model has a new champion.",
        trigger=EventTrigger(expect={PROMOTED}, match={"prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}*"},
                             posture=Posture.Reactive, threshold=1, within=0),
        actions=[SendNotification(block_document_id=block_id, subject=PROMOTED_SUBJECT, body=PROMOTED_BODY)])
    rescore = [
        AutomationCore(
            name=f"medxfer: rescore on promotion of {model}",
            description=f"Score the incoming studies again with the new champion of {model}.",
            trigger=EventTrigger(expect={PROMOTED}, match={"prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}{model}"},
                                 posture=Posture.Reactive, threshold=1, within=0),
            actions=[RunDeployment(source="selected", deployment_id=deployment_id)])
        for deployment_id, model in scoring.items()]
    return [failed, promoted, *rescore]


def scoring_deployments() -> dict[UUID, str]:
    """Scoring deployment id -> the registered model its config scores with."""
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[SCORING_FLOW])))
    return {deployment.id: load_config(REPO / deployment.parameters["config_path"],
                                       check_paths=False).registry.model_name
            for deployment in deployments}


def create(block_id: UUID, scoring: dict[UUID, str]) -> list[str]:
    """Create every automation, replacing any of the same name; returns their names."""
    automations = definitions(block_id, scoring)
    with get_client(sync_client=True) as client:
        for automation in automations:
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)
    return [automation.name for automation in automations]


def main() -> int:
    for name in create(notification_block_id(), scoring_deployments()):
        print(f"automation: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
