"""Where the single-host stack lives, the ports it listens on, and its secrets.

Everything is read from the environment (names below), with documented defaults.
Secrets come from the environment; one that is not set is generated once and kept
in `<home>/secrets.env` (mode 600, never logged), so that a restarted stack finds
the passwords its PostgreSQL roles and MLflow admin were created with.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[1]
HOME_ENV, HOST_ENV, CONFIG_ENV = "MEDXFER_STACK_HOME", "MEDXFER_STACK_HOST", "MEDXFER_STACK_CONFIG"
WORKER_LIMIT_ENV = "MEDXFER_STACK_WORKER_LIMIT"
FLOW_RUN_NICE_ENV = "MEDXFER_STACK_FLOW_RUN_NICE"
# service -> default port; each can be moved with MEDXFER_STACK_<SERVICE>_PORT.
DEFAULT_PORTS = {"postgres": 5432, "object-store": 9000, "mlflow": 5000, "prefect-server": 4200,
                 "service": 8000}
DEFAULT_CONFIG = REPO / "configs" / "breast_ultrasound.yaml"
SECRETS_FILE = "secrets.env"

# Secret -> what it protects. Each is read from the environment variable of that name.
SECRET_NAMES = {
    "MEDXFER_STACK_DB_PASSWORD": "PostgreSQL superuser medxfer_admin",
    "PREFECT_SERVER_DATABASE_PASSWORD": "PostgreSQL role prefect (the Prefect server's database)",
    "MEDXFER_STACK_MLFLOW_DB_PASSWORD": "PostgreSQL role mlflow (tracking, registry and auth databases)",
    "PREFECT_API_AUTH_STRING": "Prefect API basic auth, user:password (the server checks the same string)",
    "MLFLOW_TRACKING_PASSWORD": "MLflow basic auth: password of the admin user MLFLOW_TRACKING_USERNAME",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "MLflow auth app: signs its CSRF tokens",
    "MEDXFER_API_KEY": "the inference service's X-API-Key",
}
MLFLOW_USER_ENV, DEFAULT_MLFLOW_USER = "MLFLOW_TRACKING_USERNAME", "medxfer"
PREFECT_USER = "medxfer"


def port_env(service: str) -> str:
    return f"MEDXFER_STACK_{service.upper().replace('-', '_')}_PORT"


def free_port() -> int:
    """A port the OS reports free on 127.0.0.1 (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ephemeral_environment(home: Path) -> dict[str, str]:
    """The environment of a stack in `home` on ports the OS reports free: for tests and
    benchmarks, which share the machine with other people's servers."""
    return {HOME_ENV: str(home)} | {port_env(service): str(free_port()) for service in DEFAULT_PORTS}


def _generated(name: str) -> str:
    token = secrets.token_urlsafe(24)
    return f"{PREFECT_USER}:{token}" if name == "PREFECT_API_AUTH_STRING" else token


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def load_secrets(home: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Each secret from the environment, else from `<home>/secrets.env`, else generated
    and added to that file (created owner-only)."""
    path = home / SECRETS_FILE
    kept = _read_env_file(path)
    missing = {name: _generated(name) for name in SECRET_NAMES if not env.get(name) and name not in kept}
    if missing:
        kept |= missing
        home.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write("".join(f"{name}={value}\n" for name, value in sorted(kept.items())))
    return {name: env.get(name) or kept[name] for name in SECRET_NAMES}


@dataclass(frozen=True)
class StackSettings:
    home: Path  # pid files, logs, data folders and secrets.env
    host: str  # every server binds here (loopback unless told otherwise)
    ports: dict[str, int]
    config: Path  # the pipeline config whose registry section the service serves
    secrets: dict[str, str]
    mlflow_user: str = DEFAULT_MLFLOW_USER
    worker_limit: int = 2  # concurrent flow runs on the worker: trainings share the CPUs
    # The worker and the flow runs it starts run at this niceness, so that trainings holding every
    # core leave the servers (Prefect API and UI, PostgreSQL, MLflow, the service) responsive.
    flow_run_nice: int = 10
    bucket: str = "mlflow-artifacts"
    work_pool: str = "medxfer"  # the process pool prefect.yaml deploys to

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> "StackSettings":
        home = Path(env.get(HOME_ENV) or REPO / ".stack").resolve()
        return cls(
            home=home,
            host=env.get(HOST_ENV) or "127.0.0.1",
            ports={name: int(env.get(port_env(name)) or port) for name, port in DEFAULT_PORTS.items()},
            config=Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG).resolve(),
            secrets=load_secrets(home, env),
            mlflow_user=env.get(MLFLOW_USER_ENV) or DEFAULT_MLFLOW_USER,
            worker_limit=int(env.get(WORKER_LIMIT_ENV) or 2),
            flow_run_nice=int(env.get(FLOW_RUN_NICE_ENV) or 10),
        )

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.url('prefect-server')}/api"

    @property
    def results_dir(self) -> Path:
        """Prefect task results (PREFECT_LOCAL_STORAGE_PATH): what a retried run resumes from."""
        return self.home / "results"

    def client_environment(self) -> dict[str, str]:
        """What a client of the stack needs: the pipeline, scoring, the CLI and the service."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_AUTH_STRING": self.secrets["PREFECT_API_AUTH_STRING"],
            "MEDXFER_TRACKING_URI": self.url("mlflow"),
            "MLFLOW_TRACKING_USERNAME": self.mlflow_user,
            "MLFLOW_TRACKING_PASSWORD": self.secrets["MLFLOW_TRACKING_PASSWORD"],
            "MEDXFER_API_KEY": self.secrets["MEDXFER_API_KEY"],
            "MEDXFER_SERVICE_URL": self.url("service"),
            "PREFECT_LOCAL_STORAGE_PATH": str(self.results_dir),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The server would otherwise send large files to and from the bucket itself by
            # presigned URL: every artifact byte goes through the MLflow server instead, so
            # clients need neither S3 keys nor a route to the object store.
            "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
        }
