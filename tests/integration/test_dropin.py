"""Keras's own ModelCheckpoint tests, from the installed wheel, pass with BestModelCheckpoint on
every backend, but for the cases the README's differences table lists (tests/dropin/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "dropin" / "keras_suite.py"


def test_kerass_own_checkpoint_tests_pass_with_ours_on_every_backend():
    pytest.importorskip("keras")
    for backend in ("jax", "tensorflow"):
        pytest.importorskip(backend)
    result = subprocess.run(
        [sys.executable, str(SUITE), "-v"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
