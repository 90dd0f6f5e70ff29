"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """An offline W&B that writes only under tmp_path.

    wandb reads the environment once per process, into a singleton: teardown() around each test
    makes it read this test's directories.
    """
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    root = tmp_path / "wandb"
    root.mkdir()
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": root,
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DATA_DIR": root / "data",
        "WANDB_CACHE_DIR": root / "cache",
        "WANDB_CONFIG_DIR": root / "config",
        "WANDB_ARTIFACT_DIR": root / "artifacts",
    }.items():
        monkeypatch.setenv(var, str(value))
    yield root
    wandb.teardown()  # finishes a run left active
