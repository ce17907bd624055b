"""The installed environment is exactly requirements.lock: a package that drifted (a
hand-run `pip install`, a stale venv) fails here instead of at a site's weekend retraining."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# The installer and the project itself are not lock entries.
NOT_LOCKED = {"pip", "medxfer"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        if match:
            pins[_normalise(match[1])] = match[2]
    return pins


def _installed() -> dict[str, str]:
    return {_normalise(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def test_installed_environment_matches_the_lock():
    locked, installed = _locked(), _installed()
    assert len(locked) > 100  # the whole tree, not just the direct dependencies
    wrong = {name: (version, installed.get(name)) for name, version in locked.items()
             if installed.get(name) != version}
    extra = sorted(set(installed) - set(locked) - NOT_LOCKED)
    assert not wrong, f"installed versions differ from requirements.lock (locked, installed): {wrong}"
    assert not extra, f"installed but not in requirements.lock: {extra}"


def test_lock_holds_the_pins_that_keep_prefect_working():
    locked = _locked()
    major, minor = (int(part) for part in locked["sqlalchemy"].split(".")[:2])
    assert (major, minor) < (2, 1), "SQLAlchemy 2.1 stops Prefect 3.8.8's scheduler creating runs"
    assert locked["fastapi"].startswith("0.150."), "Prefect 3.8.8's /filter endpoints need fastapi 0.150"
    assert (locked["torch"], locked["torchvision"]) == ("2.14.1", "0.29.1")


def _requirements() -> list[Requirement]:
    """pyproject's dependencies and the extras `make lock` resolves, and constraints.txt's pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [line for extra in ("dev", "dask")
                                       for line in project["optional-dependencies"][extra]]
    lines += [line.split("#", 1)[0] for line in (ROOT / "constraints.txt").read_text().splitlines()]
    return [Requirement(line) for line in map(str.strip, lines) if line]


def test_lock_satisfies_pyproject_and_constraints():
    """An edit to pyproject.toml or constraints.txt without `make lock` fails here."""
    locked = _locked()
    unmet = {str(req): locked.get(_normalise(req.name)) for req in _requirements()
             if not req.specifier.contains(locked.get(_normalise(req.name), "0.dev0"), prereleases=True)
             or _normalise(req.name) not in locked}
    assert not unmet, f"requirements.lock does not satisfy (requirement: locked version): {unmet}; run `make lock`"
