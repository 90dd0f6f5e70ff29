"""What "nothing lost" means, as checks on a run's directory shared by the reliability tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bestsave import Manifest, fetch, load_manifest
from bestsave.layout import META, RunFiles
from bestsave.store import TMP_PREFIX, open_store
from bestsave.verify import verify

SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    """A TCP port nobody listens on at the moment, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RANKS_TIMEOUT = 150  # seconds for a whole 2-process run; a hang fails the test instead of CI


def run_ranks(
    script: str, tmp_path: Path, *options: str, world: int = 2
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start ``world`` ranks of ``scripts/<script> RUN OUT *options`` and wait for all; returns
    the report each wrote to ``OUT/rank<r>.json`` (with its exit code) and their stderr."""
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir(exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    port = str(free_port())
    processes = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPTS / script), str(run), str(out), *options],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    try:
        for p in processes:
            errors.append(p.communicate(timeout=RANKS_TIMEOUT)[1])
    except subprocess.TimeoutExpired:
        for p in processes:
            p.kill()
        pytest.fail(f"the distributed run hung for more than {RANKS_TIMEOUT} s")
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for p, report in zip(processes, reports):
        report["returncode"] = p.returncode
    return reports, errors


def names(dirpath: str | os.PathLike[str], **storage_options: Any) -> list[str]:
    """The files in a run's directory (local or remote); none when it does not exist."""
    return open_store(os.fspath(dirpath), **storage_options).names()


def leftovers(dirpath: str | os.PathLike[str], **storage_options: Any) -> list[str]:
    """Temporary files of interrupted writes: in the directory itself (where none should ever
    be) and in each run's folder, ``.bestsave/<run>/``, where they are written."""
    store = open_store(os.fspath(dirpath), **storage_options)
    found = [n for n in store.names() + store.folders() if n.startswith(TMP_PREFIX)]
    for run in store.folders(META):
        folder = RunFiles(run).folder
        inside = store.names(folder) + store.folders(folder)
        found += [f"{folder}/{n}" for n in inside if n.startswith(TMP_PREFIX)]
    return found


def assert_intact(dirpath: str | os.PathLike[str], **storage_options: Any) -> Manifest:
    """Every file the manifest names is there and matches its sha256; the best one loads.

    ``fetch`` raises :class:`bestsave.ChecksumError` or ``FileNotFoundError`` otherwise (for a
    folder, part by part). Torch checkpoints are loaded with ``weights_only=True`` (a sharded
    one consolidated) and must be the epoch their record says.
    """
    manifest = load_manifest(dirpath, **storage_options)
    records = [*manifest.kept, *([manifest.last] if manifest.last else [])]
    local = {r.name: fetch(r, **storage_options) for r in records}
    best = manifest.best
    if best is not None and best.name.endswith((".pth", ".ckpt")):
        epoch = load_whole(local[best.name]).get("epoch")
        assert epoch == best.epoch, f"{best.name} holds epoch {epoch}, its record says {best.epoch}"
    return manifest


def load_whole(path: str) -> dict[str, Any]:
    """A torch checkpoint as one dict, loaded with ``weights_only=True``: a sharded one (a
    ``torch.distributed.checkpoint`` folder) is consolidated first, as ``bestsave export`` does."""
    import torch

    if not os.path.isdir(path):
        return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    from bestsave.adapters.torch import export

    with tempfile.TemporaryDirectory() as tmp:
        export(path, os.path.join(tmp, "whole.pth"))
        return torch.load(os.path.join(tmp, "whole.pth"), weights_only=True)  # type: ignore[no-any-return]


def crash_problems(dirpath: str | os.PathLike[str], **storage_options: Any) -> list[str]:
    """What ``verify`` finds beyond what a crash may leave for the next start to clean
    (temporary files, a commit not yet renamed into place, an evicted file not yet deleted, a
    sidecar not yet written): an empty list when nothing committed is damaged."""
    return [
        str(p)
        for p in verify(dirpath, **storage_options)
        if not (p.kind == "leftover" or (p.kind == "missing" and p.name.endswith(".json")))
    ]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server (moto) on a free loopback port, for the whole session."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    endpoint = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start on {endpoint}")
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="session")
def forkserver() -> Any:
    """A multiprocessing context whose children fork from a server that imported torch (and
    Lightning) already: a training process starts in milliseconds instead of seconds."""
    import multiprocessing

    torch = pytest.importorskip("torch")
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))  # the server imports kill_train from here
    context = multiprocessing.get_context("forkserver")
    preload = ["torch", "bestsave.adapters.torch", "kill_train"]
    if torch.distributed.is_available():
        preload.append("fsdp_torch")  # the sharded run's ranks
    try:
        import bestsave.adapters.lightning  # noqa: F401
    except ImportError:
        pass
    else:
        preload += ["lightning.pytorch", "bestsave.adapters.lightning"]
    context.set_forkserver_preload(preload)
    return context
