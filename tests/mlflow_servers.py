"""A real `mlflow server` for tests: the UI and REST API over a test's own store, on a free
loopback port, stopped by process group."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stack.settings import free_port
from tests.prefect_servers import LoggedProcess, clean_environment, wait_healthy

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@dataclass
class MlflowServer:
    process: LoggedProcess
    url: str


@contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, log_path: Path,
                  startup_timeout: float = 120) -> Iterator[MlflowServer]:
    """`mlflow server` (one worker) over `backend_store_uri`, serving artifacts from `artifacts`."""
    port = free_port()
    process = LoggedProcess.start(
        [MLFLOW, "server", "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], clean_environment(), log_path)
    server = MlflowServer(process, f"http://127.0.0.1:{port}")
    try:
        wait_healthy(process, f"{server.url}/health", startup_timeout)
        yield server
    finally:
        process.stop()
