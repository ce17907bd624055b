"""Prefect events medxfer emits for others to react to (automations, the service, scoring)."""

from __future__ import annotations

from prefect.events import emit_event

from tasks.register import Registration

PROMOTED = "medxfer.model.promoted"
MODEL_RESOURCE_PREFIX = "medxfer.model."  # resource id: medxfer.model.<registered model name>


def emit_promoted(registration: Registration) -> None:
    """`medxfer.model.promoted`: a new champion, with the metric that won it. The flow run,
    its flow and deployment come along as related resources."""
    emit_event(
        event=PROMOTED,
        resource={"prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}{registration.model_name}",
                  "prefect.resource.name": registration.model_name,
                  "medxfer.model.version": registration.version},
        payload={"model": registration.model_name, "version": registration.version,
                 "metric": registration.metric, "value": registration.metric_value,
                 "reason": registration.reason, "mlflow_run_id": registration.run_id,
                 "onnx_uri": registration.onnx_uri})
