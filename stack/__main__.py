"""python -m stack up | status | down | env: the single-host production stack (see README,
"Production stack on one host")."""

from __future__ import annotations

import argparse
import shlex
import sys

from stack.host import ORDER, Stack
from stack.processes import Unhealthy
from stack.settings import StackSettings


def _print_statuses(statuses) -> bool:
    for status in statuses:
        mark = "healthy" if status.healthy else "DOWN"
        pid = f"pid {status.pid}" if status.pid else "no pid"
        print(f"{status.name:15} {mark:8} {pid:10} {status.detail}")
    return all(status.healthy for status in statuses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "status", "down", "env"])
    parser.add_argument("services", nargs="*", choices=[[], *ORDER], metavar="SERVICE",
                        help=f"some of {', '.join(ORDER)} (default: all)")
    args = parser.parse_args()
    settings = StackSettings.from_environment()
    stack = Stack(settings)
    names = tuple(name for name in ORDER if name in args.services) or ORDER
    if args.command == "env":  # for a shell: eval "$(python -m stack env)"; holds secrets, not logged
        for key, value in settings.client_environment().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if args.command == "down":
        stopped = stack.down(names)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    try:
        statuses = stack.up(names) if args.command == "up" else stack.status(names)
    except Unhealthy as exc:
        print(f"stack: {exc}", file=sys.stderr)
        _print_statuses(stack.status(names))
        return 1
    healthy = _print_statuses(statuses)
    if args.command == "up":
        print(f"\nlogs and pid files: {settings.home}/logs, {settings.home}/run\n"
              f'client environment: eval "$(.venv/bin/python -m stack env)"')
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
