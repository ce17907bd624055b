"""The Dockerfile builds what pyproject installs, from the lock, on a base that matches the wheels.

No Docker daemon runs here, so the image is not built: these tests read the Dockerfile and
check it against pyproject.toml, requirements.lock and the installed (locked) wheels.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import onnxruntime.capi.build_and_package_info as ort_build
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[list[str]]:
    """The arguments of every `NAME ...` instruction (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [shlex.split(line)[1:] for line in joined.splitlines() if line.split(maxsplit=1)[:1] == [name]]


def _copied() -> set[str]:
    """Sources of the COPY lines that copy from the build context (not `--from=` another image)."""
    sources: set[str] = set()
    for args in _instructions("COPY"):
        if not any(arg.startswith("--from=") for arg in args):
            sources |= {arg.rstrip("/") for arg in args[:-1] if not arg.startswith("--")}
    return sources


def _locked(package: str) -> str:
    (version,) = re.findall(rf"^{re.escape(package)}==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    return version


def test_copy_lines_cover_every_package_pyproject_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    copied = _copied()
    # A subpackage (tasks.pacs) lies in its parent's folder: copying `tasks` copies it.
    folders = {package.replace(".", "/") for package in packages}
    missing = {folder for folder in folders if not any(folder == c or folder.startswith(f"{c}/") for c in copied)}
    assert "." in copied or not missing, f"not copied into the image: {sorted(missing)}"
    # What `make install` reads: the build metadata (its readme too) and the lock.
    assert {"pyproject.toml", project["project"]["readme"], "requirements.lock", "Makefile"} <= copied
    assert all((ROOT / source).exists() for source in copied - {"."}), "a COPY source that does not exist"


def test_the_image_installs_from_the_lock():
    assert any(args[:2] == ["make", "install"] for args in _instructions("RUN"))
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "--no-deps -r requirements.lock" in recipe and "$(PYTHON) -m venv" in recipe
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "outputs" in ignored  # a 7 GB venv is not build context


def test_base_image_cuda_matches_the_locked_wheels():
    (base,) = _instructions("FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu24\.04", base[0])
    assert match, base
    image_cuda = match[1]
    assert torch.version.cuda.split(".")[0] == image_cuda  # torch 2.14.1+cu130
    assert ort_build.cuda_version.split(".")[0] == image_cuda  # onnxruntime-gpu 1.31.1
    assert (match[1], match[2]) == tuple(torch.version.cuda.split(".")[:2])
    assert _locked("nvidia-cuda-runtime").startswith(f"{image_cuda}.")


def test_the_image_python_is_the_lock_python():
    recipe = (ROOT / "Makefile").read_text().split("\nlock:", 1)[1].split("\n\n", 1)[0]  # how the lock is made
    locked = re.search(r"--python-version (\d+\.\d+)", recipe)[1]
    (argument,) = [arg for args in _instructions("ARG") for arg in args if arg.startswith("PYTHON_VERSION=")]
    image_python = argument.split("=", 1)[1]
    assert image_python.rsplit(".", 1)[0] == locked == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert image_python == ".".join(map(str, sys.version_info[:3]))  # the patch release the suite runs on
    (uv_copy,) = [args for args in _instructions("COPY") if any(arg.startswith("--from=") for arg in args)]
    assert uv_copy[0] == f"--from=ghcr.io/astral-sh/uv:{_locked('uv')}"
    assert 'make install PYTHON="$(uv python find ${PYTHON_VERSION})"' in DOCKERFILE
