"""The same guarantees with ``dirpath="s3://bucket/run"``, against moto's S3 server on loopback.

Eviction, ``last``, resume in a new process, checksums on load, the refusal of a second run, a
crash between commit and rename, SIGKILLs at random moments: through s3fs, as users run them.
Object stores have no rename (a copy, then a delete) and no append, so these are not the local
tests again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

from runfiles import folder_writer

from bestsave import (
    BestSaver,
    ChecksumError,
    DirectoryLockedError,
    RunExistsError,
    Staged,
    fetch,
    load_best,
    load_manifest,
)
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.layout import RunFiles, run_name
from bestsave.naming import DEFAULT_TEMPLATE
from bestsave.verify import load_history, verify

from .conftest import RANKS_TIMEOUT, SCRIPTS, assert_intact, crash_problems, free_port
from .test_kill import KILLS, SEED, Where, crash, kill_and_resume
from .test_sharded import SHARDS

CREDENTIALS = {"key": "testing", "secret": "testing"}


class Bucket:
    """A fresh bucket on the moto server, with what s3fs and boto3 need to reach it."""

    def __init__(self, endpoint: str) -> None:
        self.name = f"bestsave-{uuid.uuid4().hex[:12]}"
        self.options: dict[str, Any] = {
            **CREDENTIALS,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=CREDENTIALS["key"],
            aws_secret_access_key=CREDENTIALS["secret"],
        )
        self.client.create_bucket(Bucket=self.name)

    def url(self, run: str = "run") -> str:
        return f"s3://{self.name}/{run}"

    def objects(self, run: str = "run") -> list[str]:
        listing = self.client.list_objects_v2(Bucket=self.name, Prefix=f"{run}/")
        return sorted(o["Key"].split("/", 1)[1] for o in listing.get("Contents", []))

    def body(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()  # type: ignore[no-any-return]


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[Bucket]:
    yield Bucket(s3_endpoint)


def text_writer(text: str) -> Staged:
    """A Staged writer of a small text checkpoint (background-written when async)."""

    def serialize(snapshot: str, path: str) -> None:
        with open(path, "w") as f:
            f.write(snapshot)

    return Staged(lambda: text, serialize)


# val_acc by epoch: top 2 at the end are epochs 5 and 3; periodic (every 3) are 2 and 5.
SCORES = [0.5, 0.7, 0.6, 0.8, 0.55, 0.9]


@pytest.mark.parametrize("async_write", [True, False], ids=["async", "sync"])
def test_top_k_eviction_last_and_checksums_on_s3(bucket, async_write):
    saver = BestSaver(
        bucket.url(),
        monitor="val_acc",
        top_k=2,
        save_last=True,
        keep_every_n_epochs=3,
        extension=".bin",
        async_write=async_write,
        trackers=(),
        storage_options=bucket.options,
    )
    for epoch, score in enumerate(SCORES):
        saver.step(epoch, {"val_acc": score, "loss": 1 - score}, write=text_writer(f"e{epoch}"))
    saver.close()

    manifest = assert_intact(bucket.url(), **bucket.options)
    assert [(r.epoch, r.kind) for r in manifest.kept] == [
        (5, "best"),
        (3, "best"),  # the kind says why it was kept when it was saved
        (2, "periodic"),
        (5, "periodic"),
    ]
    kept = {r.name for r in manifest.kept}
    files = RunFiles(run_name(DEFAULT_TEMPLATE, "val_acc"), ".bin")
    sidecars = {files.sidecar(n) for n in kept}
    assert sidecars == {f"{files.folder}/{n[: -len('.bin')]}.json" for n in kept}
    # Evicted files and every temporary object are gone; the lock is released at close. The
    # checkpoints are in the directory, the run's own files in .bestsave/<run>/.
    assert bucket.objects() == sorted(kept | sidecars | {"last.bin", files.manifest, files.history})
    best = load_best(bucket.url(), **bucket.options)
    assert best.epoch == 5 and best.metrics["loss"] == pytest.approx(0.1)
    assert open(fetch(best, **bucket.options)).read() == "e5"
    assert bucket.body("run/last.bin") == b"e5"
    assert [h["epoch"] for h in load_history(bucket.url(), **bucket.options)] == list(range(6))
    assert verify(bucket.url(), **bucket.options) == []


def test_a_tampered_object_fails_its_checksum_on_s3(bucket):
    saver = BestSaver(
        bucket.url(),
        monitor="val_acc",
        extension=".bin",
        trackers=(),
        storage_options=bucket.options,
    )
    saver.step(0, {"val_acc": 0.9}, write=text_writer("weights"))
    saver.close()
    best = load_best(bucket.url(), **bucket.options)
    bucket.client.put_object(Bucket=bucket.name, Key=f"run/{best.name}", Body=b"weighTs")
    with pytest.raises(ChecksumError, match=best.name):
        fetch(best, **bucket.options)
    assert [(p.kind, p.name) for p in verify(bucket.url(), **bucket.options)] == [
        ("checksum", best.name)
    ]


def test_a_manifest_rewritten_elsewhere_is_read_afresh_on_s3(bucket):
    """A reader (``bestsave verify``, a monitoring job, the next resume) that listed the run once
    must still read the manifest after the training process rewrote it: s3fs caches listings
    (with ETags) per process, and a read against a stale ETag fails with FileExpired."""
    url = bucket.url()
    saver = BestSaver(url, monitor="val_acc", trackers=(), storage_options=bucket.options)
    saver.step(0, {"val_acc": 0.5}, write=text_writer("e0"))
    saver.close()
    assert verify(url, **bucket.options) == []  # lists the run: the listing is cached
    # The training process (another client) commits a new evaluation.
    key = f"run/{RunFiles(run_name(DEFAULT_TEMPLATE, 'val_acc')).manifest}"
    manifest = json.loads(bucket.body(key))
    manifest["state"]["evaluations"] = 2
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=json.dumps(manifest).encode())
    assert load_manifest(url, **bucket.options).state["evaluations"] == 2


def test_another_run_is_refused_on_s3_while_live_and_after(bucket, tmp_path):
    url = bucket.url()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import json, sys
                from bestsave import BestSaver
                saver = BestSaver(sys.argv[1], monitor="val_acc", trackers=(),
                                  storage_options=json.loads(sys.argv[2]))
                saver.step(0, {"val_acc": 0.5}, write=lambda p: open(p, "w").write("w"))
                print("holding", flush=True)
                sys.stdin.readline()
                saver.close()
                """
            ),
            url,
            json.dumps(bucket.options),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(DirectoryLockedError, match=f"pid {holder.pid}"):
            BestSaver(url, monitor="val_acc", resume=True, storage_options=bucket.options)
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.wait(60) == 0
    with pytest.raises(RunExistsError, match="resume=True"):
        BestSaver(url, monitor="val_acc", storage_options=bucket.options)
    assert load_best(url, **bucket.options).epoch == 0  # refused, and nothing touched


RESUMABLE = """
import sys, json, torch
from bestsave.adapters.torch import TorchCheckpointer
url, options, end = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
scores = [0.9, 0.5, 0.7, 0.4, 0.6, 0.45]
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
ckpt = TorchCheckpointer(url, monitor="val_loss", top_k=2, save_last=True, resume=True,
                         trackers=(), storage_options=options)
for epoch in range(ckpt.restore(model, optimizer), end):
    optimizer.zero_grad()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(epoch))
    model(x).pow(2).mean().backward()
    optimizer.step()
    ckpt.step(epoch, {"val_loss": scores[epoch]}, model=model, optimizer=optimizer)
ckpt.close()
"""


def test_resume_in_a_new_process_on_s3_ends_as_an_uninterrupted_run(bucket):
    def run(name: str, end: int) -> None:
        subprocess.run(
            [
                sys.executable,
                "-c",
                RESUMABLE,
                bucket.url(name),
                json.dumps(bucket.options),
                str(end),
            ],
            check=True,
            timeout=300,
        )

    run("whole", 6)
    run("resumed", 3)
    assert load_manifest(bucket.url("resumed"), **bucket.options).last.epoch == 2
    run("resumed", 6)

    def outcome(name: str) -> Any:
        manifest = assert_intact(bucket.url(name), **bucket.options)
        weights = torch.load(fetch(manifest.best, **bucket.options), weights_only=True)["model"]
        history = load_history(bucket.url(name), **bucket.options)
        return (
            [(r.epoch, r.kind, r.name) for r in manifest.kept],
            [(h["epoch"], h["decision"]) for h in history],
            weights,
        )

    whole, resumed = outcome("whole"), outcome("resumed")
    assert resumed[:2] == whole[:2]
    assert whole[0] == [(3, "best", "epoch=003-val_loss=0.4000.pth"), (5, "top_k", whole[0][1][2])]
    for key, value in whole[2].items():
        assert torch.equal(resumed[2][key], value), key
    assert verify(bucket.url("resumed"), **bucket.options) == []


def test_torch_checkpointer_on_s3_in_safetensors(bucket):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ckpt = TorchCheckpointer(
        bucket.url(),
        monitor="val_loss",
        top_k=2,
        format="safetensors",
        trackers=(),
        storage_options=bucket.options,
    )
    captured = {}
    for epoch, score in enumerate([0.5, 0.3, 0.4]):
        with torch.no_grad():
            model.weight.add_(1.0)
        captured[epoch] = model.weight.clone()
        ckpt.step(epoch, {"val_loss": score}, model=model)
    ckpt.close()
    assert all(o.endswith((".safetensors", ".json", ".jsonl")) for o in bucket.objects())
    fresh = torch.nn.Linear(4, 2)
    assert ckpt.load_best(fresh).epoch == 1
    assert torch.equal(fresh.weight, captured[1])


def test_a_crash_between_commit_and_rename_on_s3_loses_nothing(bucket):
    url = bucket.url()
    crash(url, "after-commit", bucket.options)
    manifest = assert_intact(url, **bucket.options)
    assert manifest.last.epoch == 2
    assert crash_problems(url, **bucket.options) == []
    BestSaver(
        url,
        monitor="val_loss",
        save_last=True,
        resume=True,
        trackers=(),
        storage_options=bucket.options,
    ).close()
    assert verify(url, **bucket.options) == []
    assert bucket.body("run/last") == b"epoch 2"


def test_killed_training_on_s3_loses_nothing_and_resumes_to_the_same_files(bucket, forkserver):
    kills = int(os.environ.get("BESTSAVE_S3_KILLS", min(KILLS, 10)))
    kill_and_resume(forkserver, "torch", Where(bucket.url(""), bucket.options, 40), kills, SEED + 3)


def test_folder_checkpoints_are_copied_renamed_and_evicted_whole_on_s3(bucket):
    """A kept folder is a set of keys: each part lands, moves and goes with it."""
    url = bucket.url()
    saver = BestSaver(url, monitor="val_loss", top_k=2, save_last=True, trackers=(),
                      storage_options=bucket.options)  # fmt: skip
    for epoch, score in enumerate([0.5, 0.4, 0.45, 0.3]):
        saver.step(epoch, {"val_loss": score}, write=folder_writer(f"epoch {epoch}"))
    saver.close()
    kept = sorted({o.split("/")[0] for o in bucket.objects() if not o.startswith(".bestsave")})
    assert kept == ["epoch=001-val_loss=0.4000", "epoch=003-val_loss=0.3000", "last"]
    assert bucket.body("run/last/config.json") == b"epoch 3"
    best = load_best(url, **bucket.options)
    assert sorted(best.parts) == ["config.json", "shards/part-0.bin"]
    assert open(os.path.join(fetch(best, **bucket.options), "config.json")).read() == "epoch 3"
    assert verify(url, **bucket.options) == []


def test_a_sharded_run_over_two_nodes_commits_one_run_on_s3(bucket, tmp_path):
    """Two nodes (torchrun agents with their own node rank and, where this machine allows,
    their own host name), one FSDP2 rank each, write their shards to one S3 directory; rank 0
    commits. Staging stays in each process's memory; only the shared store is common."""
    port, out = str(free_port()), tmp_path / "out"
    out.mkdir()
    agents = []
    for node in range(2):
        command = [
            os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
            "--master-addr=127.0.0.1", f"--master-port={port}",
            str(SCRIPTS / "fsdp_torch.py"), bucket.url(), str(out), "--epochs", "4",
            "--storage-options", json.dumps(bucket.options),
        ]  # fmt: skip
        if can_name_hosts():
            command = ["unshare", "--uts", "sh", "-c", f'hostname node-{node} && exec "$@"',
                       "sh", *command]  # fmt: skip
        agents.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True))  # fmt: skip
    errors = [a.communicate(timeout=RANKS_TIMEOUT)[1] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], errors
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["best"], r["best_weights_match"]) for r in reports] == [(3, True)] * 2
    manifest = load_manifest(bucket.url(), **bucket.options)
    assert [r.epoch for r in manifest.kept] == [3, 1]
    assert manifest.run["host"] == reports[0]["host"]
    if can_name_hosts():
        assert [r["host"] for r in reports] == ["node-0", "node-1"]
    parts = {o for o in bucket.objects() if o.startswith("epoch=003")}
    assert parts == {f"epoch=003-val_loss=0.3000.pth/{p}" for p in SHARDS}
    assert verify(bucket.url(), **bucket.options) == []


def can_name_hosts() -> bool:
    """Whether a process here can get a host name of its own (a UTS namespace: root)."""
    try:
        done = subprocess.run(["unshare", "--uts", "hostname", "probe"], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0
