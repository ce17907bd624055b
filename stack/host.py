"""The whole stack on one host, in start order: PostgreSQL, the object store, the MLflow
server, the Prefect server, a worker, the inference service. `up` starts what is not
running (and bootstraps it), `status` runs every health check, `down` stops in reverse."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from stack import object_store, postgres, servers
from stack.processes import Processes, Service, Status, Unhealthy
from stack.settings import StackSettings

log = logging.getLogger(__name__)
ORDER = ("postgres", "object-store", "mlflow", "prefect-server", "worker", "service")
DATABASES = [postgres.Database("prefect", "prefect", "PREFECT_SERVER_DATABASE_PASSWORD"),
             postgres.Database("mlflow", "mlflow", "MEDXFER_STACK_MLFLOW_DB_PASSWORD"),
             postgres.Database(servers.MLFLOW_AUTH_DATABASE, "mlflow", "MEDXFER_STACK_MLFLOW_DB_PASSWORD")]


class Stack:
    def __init__(self, settings: StackSettings):
        self.settings = settings
        self.processes = Processes(settings.home / "run", settings.home / "logs")

    @property
    def _pg_dir(self) -> Path:
        return self.settings.home / "postgres"

    @property
    def keys_file(self) -> Path:
        """The object store's access key, as its bootstrap made it (owner-only)."""
        return self.settings.home / "run" / "object-store-keys.json"

    @property
    def _saved_objects(self) -> Path:
        return self.settings.home / "object-store"

    def service(self, name: str) -> Service:
        s = self.settings
        if name == "postgres":
            return postgres.service(self._pg_dir / "data", self._pg_dir / "socket", s.host, s.ports["postgres"],
                                    s.secrets["MEDXFER_STACK_DB_PASSWORD"])
        if name == "object-store":
            return object_store.service(s.host, s.ports["object-store"], self.keys_file, s.bucket)
        if name == "mlflow":
            keys = object_store.read_keys(self.keys_file)
            s3 = keys.environment(s.url("object-store")) if keys else {}
            return servers.mlflow(s, s3)
        if name == "prefect-server":
            return servers.prefect_server(s)
        if name == "worker":
            return servers.worker(s)
        if name == "service":
            return servers.inference_service(s)
        raise KeyError(f"no service {name!r}; the stack has {', '.join(ORDER)}")

    def up(self, names: tuple[str, ...] = ORDER) -> list[Status]:
        """Start each named service unless it runs; wait until each is healthy."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.settings.home.chmod(0o711)  # PostgreSQL's own user must reach its data folder
        started: set[str] = set()
        for name in names:
            if name == "mlflow" and "object-store" in started and self.processes.pid(name):
                self.processes.stop(self.service(name))  # it holds the old store's keys
            if self.processes.pid(name) is None:
                self._start(name)
                started.add(name)
            self.processes.wait_healthy(self.service(name))
        return [self.processes.status(self.service(name)) for name in names]

    def _start(self, name: str) -> None:
        s = self.settings
        if name == "postgres":
            if not (self._pg_dir / "data").exists():
                postgres.initdb(self._pg_dir / "data", s.secrets["MEDXFER_STACK_DB_PASSWORD"])
            postgres.prepare_socket_dir(self._pg_dir / "socket")
            service = self.service(name)
            self.processes.start(service)
            self.processes.wait_healthy(service)
            postgres.ensure_databases(s.host, s.ports["postgres"], s.secrets["MEDXFER_STACK_DB_PASSWORD"],
                                      DATABASES, s.secrets)
        elif name == "object-store":
            self.keys_file.unlink(missing_ok=True)  # a new moto knows no keys
            service = self.service(name)
            self.processes.start(service)
            endpoint = s.url("object-store")
            self.processes.wait_healthy(Service(name, service.argv, {}, lambda: _answers(endpoint)))
            keys = object_store.bootstrap(endpoint, self.keys_file, s.bucket)
            object_store.restore(endpoint, keys, s.bucket, self._saved_objects)
        else:
            self.processes.start(self.service(name))

    def status(self, names: tuple[str, ...] = ORDER) -> list[Status]:
        return [self.processes.status(self.service(name)) for name in names]

    def down(self, names: tuple[str, ...] = ORDER) -> list[str]:
        """Stop the named services in reverse start order; the object store's bucket is saved first."""
        stopped = []
        for name in reversed(names):
            if name == "object-store" and self.processes.pid(name):
                self._save_objects()
            if self.processes.stop(self.service(name)):
                stopped.append(name)
        return stopped


    def _save_objects(self) -> None:
        keys = object_store.read_keys(self.keys_file)
        if keys is None:
            return
        try:
            object_store.save(self.settings.url("object-store"), keys, self.settings.bucket, self._saved_objects)
        except (BotoCoreError, ClientError) as exc:  # stop it all the same; say what is lost
            log.warning("object store not saved (%s): its objects are lost when it stops", exc)


def _answers(url: str) -> str:
    try:
        httpx.get(f"{url}/moto-api/", timeout=5)
    except httpx.HTTPError as exc:
        raise Unhealthy(f"{url}: {exc}") from exc
    return f"{url} answers"
