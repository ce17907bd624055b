"""PostgreSQL 15 for the Prefect server and MLflow: initdb on first start, one role and
database per server, password (SCRAM) authentication on loopback TCP only."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

from stack.processes import Service, Unhealthy

BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"),)  # Debian's postgresql-15
ADMIN_ROLE = "medxfer_admin"
SERVER_USER = "postgres"  # the server refuses to run as root; as root we run it as this user
MAX_CONNECTIONS = 200  # Prefect's pools, MLflow's workers, 20 concurrent flow runs


@dataclass(frozen=True)
class Database:
    name: str
    owner: str
    password_secret: str  # the StackSettings secret holding the owner's password


def binary(name: str) -> str:
    for folder in BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"PostgreSQL's {name} not found: install postgresql-15 (apt-get install postgresql-15)")
    return found


def server_user() -> str | None:
    """The user the server runs as: `postgres` when we are root, else ourselves (None)."""
    return SERVER_USER if os.geteuid() == 0 else None


def _chown_to_server_user(path: Path) -> None:
    user = server_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def initdb(data_dir: Path, admin_password: str) -> None:
    """A new cluster in `data_dir` with superuser medxfer_admin, SCRAM passwords for every
    connection (local socket and TCP)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(mode=0o700)
    _chown_to_server_user(data_dir)
    password_file = data_dir.parent / ".initdb-password"
    descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(admin_password)
        _chown_to_server_user(password_file)
        subprocess.run([binary("initdb"), "-D", str(data_dir), "-U", ADMIN_ROLE, "--auth=scram-sha-256",
                        f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions"],
                       check=True, user=server_user(), stdout=subprocess.DEVNULL)
    finally:
        password_file.unlink(missing_ok=True)


def service(data_dir: Path, socket_dir: Path, host: str, port: int, admin_password: str) -> Service:
    """The postgres server process; SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait
    for every client to disconnect)."""
    def health() -> str:
        with closing(connect(host, port, ADMIN_ROLE, admin_password, "postgres")) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SHOW server_version")
                return f"PostgreSQL {cursor.fetchone()[0]} on {host}:{port} (password auth)"

    return Service("postgres", [binary("postgres"), "-D", str(data_dir), "-h", host, "-p", str(port),
                                "-k", str(socket_dir), "-c", f"max_connections={MAX_CONNECTIONS}"],
                   env={}, health=health, user=server_user(), stop_signal=signal.SIGINT)


def prepare_socket_dir(socket_dir: Path) -> None:
    socket_dir.mkdir(parents=True, exist_ok=True)
    _chown_to_server_user(socket_dir)


def connect(host: str, port: int, user: str, password: str, database: str):
    try:
        connection = psycopg2.connect(host=host, port=port, user=user, password=password, dbname=database,
                                      connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise Unhealthy(str(exc).strip().splitlines()[0]) from exc
    connection.autocommit = True
    return connection


def ensure_databases(host: str, port: int, admin_password: str, databases: list[Database],
                     passwords: dict[str, str]) -> None:
    """Create each database's owner role (login, password) and the database, unless they exist;
    a role that exists gets its password set again, so the environment's value holds."""
    with closing(connect(host, port, ADMIN_ROLE, admin_password, "postgres")) as connection:
        with connection.cursor() as cursor:
            for database in databases:
                password = passwords[database.password_secret]
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (database.owner,))
                verb = "ALTER" if cursor.fetchone() else "CREATE"
                cursor.execute(sql.SQL(f"{verb} ROLE {{}} LOGIN PASSWORD %s").format(sql.Identifier(database.owner)),
                               (password,))
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database.name,))
                if cursor.fetchone() is None:
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(database.name), sql.Identifier(database.owner)))
                    cursor.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
                        sql.Identifier(database.name)))
