"""Orthanc's push to medxfer: a PACS scoring run when a study becomes stable.

This file runs inside Orthanc, in its Python plugin (Debian's `orthanc-python`, the
system Python, standard library only), not in medxfer's environment. When an image
arrives, its study is marked; when that study is stable (no new instance for Orthanc's
`StableAge` seconds), a run of medxfer's PACS scoring deployment (prefect.yaml's
`score-pacs/<config name>`) is created through the
Prefect API with the study's date as its only parameter: no name, ID, accession number
or UID leaves Orthanc, and the run finds the study by QIDO-RS itself. Results medxfer
stores back (SR, its own series) mark nothing, so they do not trigger another run.

Orthanc configuration (JSON):

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so", ...],
    "PythonScript": "/path/to/medxfer/tasks/pacs/orthanc_trigger.py",
    "Medxfer": {
      "PrefectApiUrl": "http://127.0.0.1:4200/api",
      "Deployment": "score-pacs/breast_ultrasound_pacs"
    }

A Prefect server behind basic auth: set PREFECT_API_AUTH_STRING ("user:password") in
Orthanc's environment.
"""

import base64
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request

import orthanc

# Series that hold no image to score: reports (medxfer's own results among them), documents, plans.
NON_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "SEG", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD"}
TIMEOUT_SECONDS = 10

SETTINGS = json.loads(orthanc.GetConfiguration()).get("Medxfer", {})
_pending = set()  # Orthanc ids of studies that received an image since their last trigger
_lock = threading.Lock()


def _prefect(method, path, body=None):
    request = urllib.request.Request(SETTINGS["PrefectApiUrl"].rstrip("/") + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
        return json.loads(response.read() or b"null")


def _create_run(study_date):
    """A scheduled-now run of the deployment; failures are logged by Orthanc, never raised into it."""
    try:
        flow_name, deployment = SETTINGS["Deployment"].split("/", 1)
        path = f"/deployments/name/{urllib.parse.quote(flow_name)}/{urllib.parse.quote(deployment)}"
        deployment_id = _prefect("GET", path)["id"]
        run = _prefect("POST", f"/deployments/{deployment_id}/create_flow_run",
                       {"parameters": {"study_dates": [study_date]}, "tags": ["orthanc-stable-study"]})
        orthanc.LogWarning(f"medxfer: created PACS scoring run {run['id']} for a stable study")
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        orthanc.LogError(f"medxfer: could not create a PACS scoring run: {type(exc).__name__}: {exc}")


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.NEW_INSTANCE:
        instance = json.loads(orthanc.RestApiGet(f"/instances/{resource_id}"))
        series = json.loads(orthanc.RestApiGet(f"/series/{instance['ParentSeries']}"))
        if series.get("MainDicomTags", {}).get("Modality", "") not in NON_IMAGE_MODALITIES:
            with _lock:
                _pending.add(series["ParentStudy"])
    elif change_type == orthanc.ChangeType.STABLE_STUDY:
        with _lock:
            if resource_id not in _pending:
                return
            _pending.discard(resource_id)
        study = json.loads(orthanc.RestApiGet(f"/studies/{resource_id}"))
        study_date = study.get("MainDicomTags", {}).get("StudyDate", "")
        orthanc.LogWarning("medxfer: a study with new images is stable; asking Prefect for a scoring run")
        # Off Orthanc's change thread: the Prefect API may be slow or down.
        threading.Thread(target=_create_run, args=(study_date,), daemon=True).start()


if SETTINGS.get("PrefectApiUrl") and SETTINGS.get("Deployment"):
    orthanc.RegisterOnChangeCallback(on_change)
else:
    orthanc.LogError("medxfer: set Medxfer.PrefectApiUrl and Medxfer.Deployment in Orthanc's configuration")
