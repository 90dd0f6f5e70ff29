"""Facts about the run, recorded with every checkpoint: who, where, with what code."""

from __future__ import annotations

import math
import os
import platform
import socket
import subprocess
import sys
import uuid
from importlib import metadata
from typing import Any

from bestsave.metrics import as_number

# Versions are recorded for these when the training script has imported them; bestsave never
# imports a framework to find out.
_PACKAGES = (
    "torch",
    "lightning",
    "pytorch_lightning",
    "fastai",
    "keras",
    "jax",
    "tensorflow",
    "torchmetrics",
    "wandb",
    "mlflow",
)


def package_versions() -> dict[str, str]:
    """Versions of bestsave, Python and the frameworks this process has imported."""
    versions = {"python": platform.python_version(), "bestsave": _version("bestsave")}
    for name in _PACKAGES:
        if name in sys.modules:
            versions[name] = _version(name.replace("_", "-")) or getattr(
                sys.modules[name], "__version__", "unknown"
            )
    return {k: v for k, v in versions.items() if v}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def git_info(cwd: str | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the git work tree around ``cwd``, or {} outside one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ("git", *args), cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty}


def collect(
    framework: str | None = None, hparams: dict[str, Any] | None = None, started: str = ""
) -> dict[str, Any]:
    """Run info for a new run."""
    info: dict[str, Any] = {
        "id": uuid.uuid4().hex[:12],
        "started": started,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "framework": framework or "none",
        "versions": package_versions(),
    }
    git = git_info()
    if git:
        info["git"] = git
    if hparams:
        info["hparams"] = jsonable(hparams)
    return info


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: numbers that are not finite, and objects, become text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    number = as_number(value)
    return jsonable(number) if number is not None else str(value)
