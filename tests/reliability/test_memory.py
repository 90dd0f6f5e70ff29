"""Bounded staging memory (``staging_memory``): a run whose memory is capped finishes with the
right best where two copies of its state would get it killed, and every step down (two buffer
sets, one, chunked, streaming) writes the bytes the synchronous path writes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bestsave import BestSaveWarning, SaverOptions, WriteError, load_manifest
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.verify import verify

from .conftest import SCRIPTS

SCORES = [0.9, 0.8, 0.85, 0.7, 0.6]


def capped(tmp_path: Path, *options: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    """Run ``scripts/capped_train.py``; its exit code and report (empty when it was killed)."""
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "capped_train.py"), str(tmp_path / uuid.uuid4().hex),
         *options],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    lines = run.stdout.strip().splitlines()
    return run.returncode, json.loads(lines[-1]) if lines else {}


def memory_cgroup() -> Path | None:
    """This process's memory cgroup (v2, or v1's memory controller), when a child can be made
    in it (root, a writable hierarchy); else None."""
    try:
        lines = [line.rstrip("\n").split(":", 2) for line in open("/proc/self/cgroup")]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":
            where = Path("/sys/fs/cgroup" + path)
            if "memory" not in (where / "cgroup.controllers").read_text().split():
                continue
            if "memory" not in (where / "cgroup.subtree_control").read_text().split():
                continue
        elif "memory" in controllers.split(","):
            where = Path("/sys/fs/cgroup/memory" + path)
        else:
            continue
        child = where / f"bestsave-test-{uuid.uuid4().hex[:8]}"
        try:
            child.mkdir()
        except OSError:
            continue
        return child
    return None


def test_a_run_under_a_cgroup_memory_limit_finishes_where_two_copies_get_it_killed(tmp_path):
    # The limit leaves room for the live state and 1.8 times its size more (201 MB of state).
    groups = [memory_cgroup(), memory_cgroup()]
    if None in groups:
        pytest.skip("no memory cgroup can be made here (needs root and a writable hierarchy)")
    try:
        code, report = capped(tmp_path, "--cgroup", str(groups[0]))
        assert code == 0, report
        assert report["error"] is None
        assert (report["best"], report["weights_match"]) == (3, True)
        assert report["staging"] == "chunked"
        assert "left under the cgroup's memory limit" in report["warnings"][0]
        # Two buffer sets, as before budgets: the kernel kills the process.
        code, report = capped(tmp_path, "--cgroup", str(groups[1]), "--staging-memory", "10GB")
        assert code == -9, report
    finally:
        for group in groups:
            assert group is not None
            group.rmdir()


def test_a_limit_on_a_parent_cgroup_bounds_the_default_budget():
    """A batch job's limit is often on the job's cgroup and each task runs in a child of it
    with no limit of its own: the default budget still sees the job's."""
    parent = memory_cgroup()
    if parent is None:
        pytest.skip("no memory cgroup can be made here (needs root and a writable hierarchy)")
    child = parent / "task"
    try:
        v2 = (parent / "memory.max").exists()
        if v2:
            (parent / "cgroup.subtree_control").write_text("+memory")
        (parent / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(3 << 30))
        child.mkdir()
        probe = (
            "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
            "from bestsave.memory import Budget, available_memory;"
            "print(*available_memory(), Budget.of(None).bytes, sep='\\n')"
        )
        run = subprocess.run([sys.executable, "-c", probe, str(child / "cgroup.procs")],
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        room, limit, budget = run.stdout.splitlines()
        assert limit == "left under the cgroup's memory limit", run.stdout
        assert 0 < int(room) <= 3 << 30 and 0 < int(budget) <= (3 << 30) // 2
    finally:
        if child.exists():
            child.rmdir()
        parent.rmdir()


def test_a_run_under_an_address_space_limit_finishes_where_two_copies_fail(tmp_path):
    # glibc reserves 64 MB of address space for each thread's malloc arena, which RLIMIT_AS
    # counts though no memory backs it: one arena keeps the cap about memory.
    env = {"MALLOC_ARENA_MAX": "1"}
    code, report = capped(tmp_path, env=env)
    assert code == 0 and report["error"] is None, report
    assert (report["best"], report["weights_match"], report["staging"]) == (3, True, "chunked")
    assert "RLIMIT_AS" in report["warnings"][0]
    # Two buffer sets, as before budgets: an allocation fails, reported or aborting the process.
    code, report = capped(tmp_path, "--staging-memory", "10GB", env=env)
    assert code != 0 or "allocate memory" in (report.get("error") or ""), report


def train(directory: Path, **options: object) -> TorchCheckpointer:
    """Five epochs of a 48 MB model, saved with its optimiser and a rolling last."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(12)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ckpt = TorchCheckpointer(directory, monitor="val_loss", top_k=2, save_last=True,
                             trackers=(), **options)  # fmt: skip
    x = torch.randn(8, 1024)
    try:
        for epoch, loss in enumerate(SCORES):
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            ckpt.step(epoch, {"val_loss": loss}, model=model, optimizer=optimizer)
    finally:
        ckpt.close()  # after a failed write, what was written before it is committed
    return ckpt


def files(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file()
    }


@pytest.mark.parametrize(
    "budget, step, buffer_sets",
    [("1GB", "two sets", 2), ("150MB", "one set", 1), ("80MB", "chunked", 0),
     ("1MB", "streaming", 0)],
)  # fmt: skip
def test_each_step_writes_the_files_the_synchronous_path_writes(tmp_path, budget, step,
                                                                 buffer_sets):  # fmt: skip
    synchronous = train(tmp_path / "sync", async_write=False)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ckpt = train(tmp_path / "budget", staging_memory=budget)
    assert files(tmp_path / "budget") == files(tmp_path / "sync")
    assert [r.epoch for r in ckpt.kept] == [r.epoch for r in synchronous.kept] == [4, 3]
    assert {r.staging for r in [*ckpt.kept, ckpt.saver.last]} == {step}
    told = [str(w.message) for w in said if issubclass(w.category, BestSaveWarning)]
    assert len(told) == (step != "two sets"), told  # said once, and only when it costs
    assert all(f"staging_memory={budget!r}" in t for t in told)
    assert sum(map(bool, ckpt._stager._slots)) == buffer_sets


def test_a_bad_budget_says_how_to_write_one(tmp_path):
    with pytest.raises(ValueError, match="such as '8GB' or '512MiB'"):
        SaverOptions(monitor="val_loss", staging_memory="lots")
    with pytest.raises(ValueError, match="staging_memory must be"):
        TorchCheckpointer(tmp_path, monitor="val_loss", staging_memory=-1)
    with pytest.raises(ValueError, match=r"whole number of bytes \(an int"):
        SaverOptions(monitor="val_loss", staging_memory=8e9)


def test_a_chunked_write_that_fails_keeps_the_best_and_says_why(tmp_path, monkeypatch):
    # The disk fills while the spool's thread writes the third checkpoint.
    import bestsave.jobs

    written = {"files": 0}

    class FillingDisk(bestsave.jobs.HashingFile):  # type: ignore[misc, name-defined]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            written["files"] += 1
            self.full = written["files"] == 3

        def write(self, b: object) -> int:
            if self.full and self.tell() > 10 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            return super().write(b)

    monkeypatch.setattr(bestsave.jobs, "HashingFile", FillingDisk)
    with pytest.raises(OSError) as caught:
        train(tmp_path, staging_memory="80MB")
    assert isinstance(caught.value, WriteError) and caught.value.errno == errno.ENOSPC
    assert "previous best is intact" in str(caught.value)
    manifest = load_manifest(tmp_path)
    assert [r.epoch for r in manifest.kept] == [1, 0]  # as committed before the full disk
    assert verify(tmp_path) == []
