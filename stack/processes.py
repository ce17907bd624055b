"""Servers as plain background processes: started with a pid file and a log, checked,
and stopped by that pid (never by name: other people's servers share the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping


class Unhealthy(RuntimeError):
    """A health check's finding, in one line."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    env: Mapping[str, str]  # on top of the caller's environment
    health: Callable[[], str]  # one line saying what answered; raises Unhealthy (or an OSError) when not
    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)
    stop_signal: int = signal.SIGTERM
    cwd: Path | None = None
    start_timeout: float = 180.0
    unset: tuple[str, ...] = field(default=())  # caller's variables this server must not inherit
    nice: int = 0  # a lower CPU weight for it and its session (`nice -n`, `lower_session_weight`)


@dataclass(frozen=True)
class Status:
    name: str
    pid: int | None
    healthy: bool
    detail: str


class Processes:
    """Pid files under `run_dir`, logs under `log_dir`, one of each per service."""

    def __init__(self, run_dir: Path, log_dir: Path):
        self.run_dir, self.log_dir = run_dir, log_dir

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid of `name` if its pid file names a live process that we started, else None.
        The file holds the pid and the process's start time, so a pid the kernel has since
        given to another process is never mistaken for ours."""
        try:
            pid, started = (int(part) for part in self.pid_file(name).read_text().split())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) and _start_time(pid) == started else None

    def start(self, service: Service) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if key not in service.unset} | dict(service.env)
        argv = ["nice", "-n", str(service.nice), *service.argv] if service.nice else service.argv
        with open(self.log_file(service.name), "ab") as log:
            process = subprocess.Popen(argv, env=env, cwd=service.cwd, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, user=service.user,
                                       start_new_session=True)  # its own process group, stopped as one
        if service.nice:
            lower_session_weight(process.pid, service.nice)
        self.pid_file(service.name).write_text(f"{process.pid} {_start_time(process.pid)}\n")
        return process.pid

    def wait_healthy(self, service: Service) -> str:
        deadline = time.monotonic() + service.start_timeout
        while True:
            if self.pid(service.name) is None:
                raise Unhealthy(f"{service.name} exited while starting: see {self.log_file(service.name)}")
            try:
                return service.health()
            except (Unhealthy, OSError) as exc:
                if time.monotonic() > deadline:
                    raise Unhealthy(f"{service.name} not healthy after {service.start_timeout:.0f} s: {exc}; "
                                    f"see {self.log_file(service.name)}") from exc
            time.sleep(0.5)

    def status(self, service: Service) -> Status:
        pid = self.pid(service.name)
        if pid is None:
            return Status(service.name, None, False, "not running")
        try:
            return Status(service.name, pid, True, service.health())
        except (Unhealthy, OSError) as exc:
            return Status(service.name, pid, False, str(exc))

    def stop(self, service: Service, timeout: float = 60.0) -> bool:
        """Signal the service's process group, wait, then kill it; False if it was not running."""
        pid = self.pid(service.name)
        if pid is None:
            self.pid_file(service.name).unlink(missing_ok=True)
            return False
        os.killpg(pid, service.stop_signal)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)
        self.pid_file(service.name).unlink(missing_ok=True)
        return True


def lower_session_weight(session_leader: int, niceness: int) -> None:
    """Where Linux schedules each session as one group (autogroup, the default on a host without
    systemd), a nice value weighs only against the processes of the same session, and every session
    gets an equal share: the session's own weight is what yields the CPUs to other sessions."""
    try:
        Path(f"/proc/{session_leader}/autogroup").write_text(str(niceness))
    except OSError:  # no autogroup in this kernel: the nice value alone sets the weight
        pass


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): state is [0]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()


def children_by_parent() -> dict[int, list[int]]:
    """Every running process's pid, listed under its parent's pid (read from /proc now)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(_stat_fields(int(stat.parent.name))[1])
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def _start_time(pid: int) -> int:
    return int(_stat_fields(pid)[19])  # field 22 of stat: start time in clock ticks since boot


def _alive(pid: int) -> bool:
    """True while `pid` runs; reaps it if it is our exited child."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:  # not our child: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; its parent has not reaped it yet
        return _stat_fields(pid)[0] != "Z"
    except FileNotFoundError:
        return False
