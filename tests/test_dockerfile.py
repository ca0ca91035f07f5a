"""The Dockerfile without a Docker daemon: it builds the `pivotmap:latest` that infra/compose.yaml
runs, on Python 3.11, with torch pinned as pyproject.toml and the Makefile pin it and installed
first, then this package constrained by requirements.lock; .dockerignore keeps the build
context to what the image installs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _args(instructions) -> dict[str, str]:
    out = {}
    for name, rest in instructions:
        if name == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value.strip('"')
    return out


def _pyproject_torch() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"torch==([^"]+)"', text).group(1)


def test_the_base_is_python_3_11():
    instructions = _instructions()
    (base,) = [rest for name, rest in instructions if name == "FROM"]
    image = base.replace("${PYTHON_IMAGE}", _args(instructions)["PYTHON_IMAGE"])
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-\w+", image), image


def test_torch_is_pinned_like_pyproject_and_installed_first():
    instructions = _instructions()
    assert _args(instructions)["TORCH_VERSION"] == _pyproject_torch() == "2.13.0"
    makefile = (REPO / "Makefile").read_text()
    assert f"pip install --quiet torch=={_pyproject_torch()}" in makefile
    runs = [rest for name, rest in instructions if name == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    package_step = next(i for i, r in enumerate(runs) if "-c requirements.lock" in r)
    assert torch_step < package_step
    # the CPU wheel by default, PyPI's CUDA build with CUDA=1 (plus the gpu extra), or an index
    assert "https://download.pytorch.org/whl/cpu" in runs[torch_step]
    assert '"$CUDA" = "1"' in runs[torch_step] and "[gpu]" in runs[package_step]
    # the version check after the lock-constrained install: nothing may have replaced torch
    assert "torch.__version__" in runs[package_step]


def test_the_lock_and_the_package_are_what_the_image_installs():
    instructions = _instructions()
    copied = " ".join(rest for name, rest in instructions if name == "COPY")
    for path in ("requirements.lock", "pyproject.toml", "README.md", "flows", "tasks", "models"):
        assert path in copied and (REPO / path).exists(), path
    assert ("WORKDIR", "/opt/pivotmap") in instructions
    env = " ".join(rest for name, rest in instructions if name == "ENV")
    assert "PIVOTMAP_REPO=/opt/pivotmap" in env
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "demo-out"} <= set(ignored)
    assert not {"pivotmap", "flows", "tasks", "models", "requirements.lock"} & set(ignored)


def test_compose_runs_this_image_at_the_same_checkout():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    ours = {name for name, s in services.items() if s["image"] == "pivotmap:latest"}
    assert ours >= {"dask-scheduler", "dask-worker-cpu", "prefect-worker-cpu", "prefect-worker-gpu"}
    assert all(services[n].get("working_dir", "/opt/pivotmap") == "/opt/pivotmap" for n in ours)
    assert compose["x-pivotmap-env"]["PIVOTMAP_REPO"] == "/opt/pivotmap"
    assert "docker build -t pivotmap:latest ." in (REPO / "Dockerfile").read_text()
