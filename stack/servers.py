"""The MLflow tracking server, the Prefect server, its worker and the inference service, as
`Service`s: the command, the environment (secrets only there, never on the command line)
and a health check that also proves the server refuses no credentials."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
from prefect.workers.process import ProcessWorker

from stack.processes import Service, Unhealthy
from stack.settings import REPO, StackSettings

MLFLOW_AUTH_DATABASE = "mlflow_auth"
MLFLOW_WORKERS = 2  # uvicorn workers; the default 4 is more than 2 cores want
# MLflow's client retries each request with exponential backoff (1, 2, 4, ... s) before it
# gives up: the first defence against a registry or object store that blinks.
MLFLOW_CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# Any other database or auth settings the caller's shell holds must not reach the servers.
PREFECT_CLIENT_ONLY = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILE")


def _get(url: str, auth: tuple[str, str] | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    try:
        return httpx.get(url, auth=auth, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise Unhealthy(f"{url}: {type(exc).__name__}: {exc}") from exc


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise Unhealthy(f"{what}: HTTP {response.status_code} from {response.request.url}, expected {status}")


def mlflow_auth_ini(settings: StackSettings) -> Path:
    """The basic-auth app's config file. It holds no secret: the database password comes from
    PGPASSWORD and the admin's from MLFLOW_AUTH_ADMIN_PASSWORD, both in the server's environment.
    Users other than the admin get no permission until one is granted. Each password check
    is a PBKDF2 hash (about half a second of CPU), and a pipeline run makes hundreds of
    requests: a successful check is cached for a minute (a changed password takes effect
    within that minute)."""
    path = settings.home / "mlflow" / "basic_auth.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = postgresql://mlflow@{settings.host}:{settings.ports['postgres']}/{MLFLOW_AUTH_DATABASE}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n")
    return path


def mlflow(settings: StackSettings, s3_environment: dict[str, str]) -> Service:
    """Tracking and registry on PostgreSQL, artifacts proxied to s3://<bucket> (clients need no
    S3 keys), behind MLflow's basic-auth app."""
    host, port, secrets = settings.host, settings.ports["mlflow"], settings.secrets
    url = settings.url("mlflow")
    database = f"postgresql://mlflow@{host}:{settings.ports['postgres']}/mlflow"

    def health() -> str:
        _expect(_get(f"{url}/health"), 200, "MLflow /health")
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        _expect(_get(search), 401, "MLflow without credentials")
        _expect(_get(search, auth=(settings.mlflow_user, secrets["MLFLOW_TRACKING_PASSWORD"])), 200,
                "MLflow as the admin user")
        return f"tracking API on {url} (basic auth; PostgreSQL store; artifacts s3://{settings.bucket})"

    argv = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
            "--workers", str(MLFLOW_WORKERS), "--backend-store-uri", database,
            "--artifacts-destination", f"s3://{settings.bucket}", "--serve-artifacts"]
    env = {"PGPASSWORD": secrets["MEDXFER_STACK_MLFLOW_DB_PASSWORD"],
           "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_ini(settings)),
           "MLFLOW_AUTH_ADMIN_USERNAME": settings.mlflow_user,
           "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["MLFLOW_TRACKING_PASSWORD"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"],
           # MLflow 3's job runner (GenAI scoring, trace archival: nothing medxfer uses) would
           # start seven more Python processes beside the server.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           **s3_environment}
    return Service("mlflow", argv, env, health, cwd=settings.home / "mlflow",
                   unset=("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))


def prefect_server(settings: StackSettings) -> Service:
    """The Prefect API and UI on PostgreSQL (asyncpg), with API basic auth."""
    host, port = settings.host, settings.ports["prefect-server"]
    api = settings.prefect_api_url

    def health() -> str:
        _expect(_get(f"{api}/ready"), 200, "Prefect /api/ready (database reachable)")
        try:
            refused = httpx.post(f"{api}/flows/filter", json={}, timeout=10)
            accepted = httpx.post(f"{api}/flows/filter", json={}, timeout=10,
                                  auth=tuple(settings.secrets["PREFECT_API_AUTH_STRING"].split(":", 1)))
        except httpx.HTTPError as exc:
            raise Unhealthy(f"{api}: {exc}") from exc
        _expect(refused, 401, "Prefect API without credentials")
        _expect(accepted, 200, "Prefect API with the auth string")
        return f"API and UI on {settings.url('prefect-server')} (basic auth; PostgreSQL)"

    env = {"PREFECT_HOME": str(settings.home / "prefect"),
           "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
           "PREFECT_SERVER_DATABASE_HOST": host,
           "PREFECT_SERVER_DATABASE_PORT": str(settings.ports["postgres"]),
           "PREFECT_SERVER_DATABASE_USER": "prefect",
           "PREFECT_SERVER_DATABASE_NAME": "prefect",
           "PREFECT_SERVER_DATABASE_PASSWORD": settings.secrets["PREFECT_SERVER_DATABASE_PASSWORD"],
           "PREFECT_SERVER_API_AUTH_STRING": settings.secrets["PREFECT_API_AUTH_STRING"],
           "PREFECT_SERVER_API_HOST": host,
           "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api,
           "PREFECT_UI_URL": settings.url("prefect-server")}  # links in notifications
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    return Service("prefect-server", argv, env, health,
                   unset=PREFECT_CLIENT_ONLY + ("PREFECT_API_DATABASE_CONNECTION_URL",
                                                "PREFECT_SERVER_DATABASE_CONNECTION_URL"))


def worker_environment(settings: StackSettings) -> dict[str, str]:
    """What the worker and the flow runs it starts see: the stack's endpoints and client
    credentials, task results kept in the stack's folder, this checkout importable."""
    return settings.client_environment() | MLFLOW_CLIENT_RETRIES | {"PYTHONPATH": str(REPO)}


def worker_job_template(settings: StackSettings) -> Path:
    """The process pool's job template with the engine command set (`python -m prefect.engine`, what
    the worker runs anyway). With it set, the worker starts each flow run inside the worker's own
    session, whose lowered CPU weight the flow runs share; unset, Prefect starts each flow run in a
    new session at full weight."""
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = f"{sys.executable} -m prefect.engine"
    path = settings.home / "worker" / "job_template.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(template, indent=2))
    return path


def worker(settings: StackSettings) -> Service:
    """A process worker polling the stack's work pool; runs at most `worker_limit` flow runs at once,
    it and its session at niceness `flow_run_nice`, which its flow runs inherit: they run in its
    session (`worker_job_template`). It creates the pool with that template when the pool is missing."""
    def health() -> str:
        try:
            response = httpx.post(f"{settings.prefect_api_url}/work_pools/{settings.work_pool}/workers/filter",
                                  json={}, timeout=10,
                                  auth=tuple(settings.secrets["PREFECT_API_AUTH_STRING"].split(":", 1)))
        except httpx.HTTPError as exc:
            raise Unhealthy(f"Prefect API: {exc}") from exc
        _expect(response, 200, f"workers of pool {settings.work_pool}")
        online = [w["name"] for w in response.json() if w.get("status") == "ONLINE"]
        if not online:
            raise Unhealthy(f"no worker of pool {settings.work_pool} is online yet")
        return f"{', '.join(online)} online, polling pool {settings.work_pool} (limit {settings.worker_limit})"

    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", settings.work_pool, "--type", "process",
            "--name", "medxfer-stack-worker", "--limit", str(settings.worker_limit),
            "--base-job-template", str(worker_job_template(settings))]
    return Service("worker", argv, worker_environment(settings), health, cwd=REPO, nice=settings.flow_run_nice)


def inference_service(settings: StackSettings) -> Service:
    """The champion behind /v1/predict, read from the stack's MLflow, with an API key."""
    url = settings.url("service")

    def health() -> str:
        _expect(_get(f"{url}/healthz"), 200, "service /healthz")
        refused = httpx.post(f"{url}/v1/predict", content=b"", headers={"Content-Type": "application/dicom"},
                             timeout=10)
        _expect(refused, 401, "service without its API key")
        ready = _get(f"{url}/readyz").json()
        model = ready["model"]
        serving = (f"serving {model['name']} v{model['version']} on {model['provider']}" if model
                   else f"no champion yet ({ready['load_error']})")
        return f"{url} (API key required); {serving}"

    env = {key: value for key, value in settings.client_environment().items()
           if key.startswith(("MEDXFER_", "MLFLOW_"))} | MLFLOW_CLIENT_RETRIES
    argv = [sys.executable, "-m", "serve", str(settings.config), "--host", settings.host,
            "--port", str(settings.ports["service"])]
    return Service("service", argv, env | {"PYTHONPATH": str(REPO)}, health, cwd=REPO)
