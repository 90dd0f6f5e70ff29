"""SIGKILL at random moments: nothing committed is lost, and resuming ends where a clean run ends.

A training process (``scripts/kill_train.py``: a few MB of state saved every epoch, top 3,
periodic files, ``last`` and patience) is killed with SIGKILL at moments drawn from a seeded
schedule: while it writes in the background, between the manifest and the renames, while it
recovers from the previous kill. After every kill:

- every file the manifest names exists and matches its sha256, and the best one loads with
  ``torch.load(weights_only=True)`` and is the epoch its record says;
- ``bestsave.verify`` finds nothing but what a crash may leave (temporary files, a commit not yet
  renamed into place, an evicted file not yet deleted, a sidecar not yet written);
- the next start cleans all of it before training goes on (``verify`` finds nothing at all);

and the run, resumed again and again until it ends, keeps the same files (epochs, kinds, names,
bytes of the weights), history and decisions as the same run never interrupted.

A sharded run (``scripts/fsdp_torch.py``: FSDP2 on two gloo processes, every rank writing its
shards of every epoch's save in the background, rank 0 committing) is killed the same way, one
rank (0 or 1) or both at once during its saves; the rank left is killed a moment later, as
``torchrun`` does. After every kill the checks above hold, the best loads on one process and,
when the run resumes, on a fresh process group, with the weights that epoch had; and the run,
resumed until it ends, keeps the same checkpoints, part for part in the weights.

The number of kills is ``BESTSAVE_KILLS`` (default 30; ``nox -s stress`` sets 300), a third of
that for the sharded run, whose starts cost more. Processes are forked from a server that has
imported torch already, so a start costs milliseconds, not an interpreter start;
``test_killed_fresh_interpreters_resume`` runs the script as users do.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

torch = pytest.importorskip("torch")

from runfiles import run_folder

from bestsave import BestSaver, fetch, load_best, load_manifest
from bestsave.layout import HISTORY, LOCK, META, RunFiles, run_name, runs_in
from bestsave.naming import DEFAULT_TEMPLATE
from bestsave.store import TMP_PREFIX, open_store
from bestsave.verify import load_history, verify

from .conftest import (
    SCRIPTS,
    assert_intact,
    crash_problems,
    free_port,
    leftovers,
    load_whole,
    names,
)

sys.path.insert(0, str(SCRIPTS))
import kill_train

if torch.distributed.is_available():
    import fsdp_torch

KILLS = int(os.environ.get("BESTSAVE_KILLS", "30"))
SEED = int(os.environ.get("BESTSAVE_KILL_SEED", "20240607"))
TIMEOUT = 120.0  # seconds one message from the child may take before the test fails


def lightning_works() -> bool:
    try:
        from bestsave.adapters.lightning import BestCheckpoint  # noqa: F401
    except ImportError:
        return False
    return True


class Where(NamedTuple):
    """A run's directory: a local path or a URL, with its fsspec options."""

    url: str
    options: dict[str, Any]
    epochs: int | None = None
    """Train this many epochs instead of the script's default."""

    def sub(self, name: str) -> Where:
        return Where(f"{self.url.rstrip('/')}/{name}", self.options, self.epochs)

    def has_run(self) -> bool:
        """A manifest has been committed (in ``.bestsave/<run>/``)."""
        return bool(runs_in(open_store(self.url, **self.options)))


class Child:
    """One process of a start of the training run, forked from the server: ``target(conn,
    *args)`` reports its progress through ``conn``; killed or left to finish."""

    def __init__(self, context: Any, target: Any, *args: Any) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=target, args=(child_conn, *args), daemon=True)
        self.process.start()
        child_conn.close()

    @classmethod
    def training(cls, context: Any, framework: str, where: Where, async_write: bool) -> Child:
        """A start of ``scripts/kill_train.py``."""
        return cls(context, kill_train.run_in_child, framework, where.url, async_write,
                   where.options, where.epochs)  # fmt: skip

    def receive(self) -> Any:
        """The next progress message, or None once the process is gone."""
        if not self.conn.poll(TIMEOUT):
            self.kill()
            pytest.fail(f"the training process sent nothing for {TIMEOUT} s")
        try:
            return self.conn.recv()  # type: ignore[no-any-return]
        except EOFError:
            return None

    def go(self) -> None:
        self.conn.send("go")

    def kill(self) -> bool:
        """SIGKILL; False when the run had ended by itself already."""
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        # Wait until it is reaped: a zombie keeps its pid, and the lock would count it alive.
        self.process.join()
        if self.process.exitcode == 0:
            return False
        self.conn.close()
        return True

    def finish(self, message: tuple[str, int] | None = ("ready", 0)) -> None:
        """Wait for the run to end; ``message`` is the last one already received."""
        while message is not None and message[0] != "done":
            message = self.receive()
        assert message is not None, "the training process died before it finished"
        self.process.join(TIMEOUT)
        assert self.process.exitcode == 0, f"the training process exited {self.process.exitcode}"
        self.conn.close()


def check_after_kill(where: Where) -> bool:
    """Nothing committed is lost; returns whether the kill interrupted a write."""
    if not where.has_run():
        # Killed before the first commit: no checkpoint is in place yet, and the run's folder
        # holds only temporary files, the lock and the history the next start truncates.
        checkpoints = names(where.url, **where.options)
        assert checkpoints == [], f"files outside any commit: {checkpoints}"
        store = open_store(where.url, **where.options)
        stray = [
            f"{run}/{n}"
            for run in store.folders(META)
            for n in store.names(RunFiles(run).folder)
            if not n.startswith(TMP_PREFIX) and n not in (LOCK, HISTORY)
        ]
        assert stray == [], f"files outside any commit: {stray}"
        return bool(leftovers(where.url, **where.options))
    assert_intact(where.url, **where.options)
    assert crash_problems(where.url, **where.options) == []
    return bool(verify(where.url, **where.options) or leftovers(where.url, **where.options))


def check_clean_start(where: Where) -> None:
    """The next start owns the directory: no temporary file, nothing for verify to report."""
    assert leftovers(where.url, **where.options) == []
    if where.has_run():
        assert [str(p) for p in verify(where.url, **where.options)] == []


def weights(record: Any, framework: str, options: dict[str, Any]) -> dict[str, Any]:
    state = load_whole(fetch(record, **options))
    return state["model"] if framework == "torch" else state["state_dict"]


def assert_same_run(where: Where, reference: Where, framework: str) -> None:
    """The resumed run kept what the uninterrupted one kept, byte for byte in the weights."""
    got = assert_intact(where.url, **where.options)
    want = assert_intact(reference.url, **reference.options)
    assert [str(p) for p in verify(where.url, **where.options)] == []

    def kept(m: Any) -> list[tuple[int, str, str, float | None]]:
        return [(r.epoch, r.kind, r.name, r.score) for r in m.kept]

    assert kept(got) == kept(want)
    assert got.best.name == want.best.name
    assert got.last.epoch == want.last.epoch
    # The saver's whole state (best score, patience counter, ranking, warnings) but the size of
    # a history whose lines hold times.
    assert {**got.state, "history_bytes": 0} == {**want.state, "history_bytes": 0}

    def history(w: Where) -> list[tuple[Any, ...]]:
        return [(h["epoch"], h["score"], h["decision"]) for h in load_history(w.url, **w.options)]

    assert history(where) == history(reference)
    for a, b in [*zip(got.kept, want.kept), (got.last, want.last)]:
        assert a.metrics == b.metrics, a.name
        mine = weights(a, framework, where.options)
        theirs = weights(b, framework, reference.options)
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), f"{a.name}: {key} differs"


def reference_run(context: Any, framework: str, where: Where) -> Where:
    child = Child.training(context, framework, where, async_write=True)
    assert child.receive() == ("ready", 0)
    child.go()
    child.finish()
    return where


def kill_and_resume(context: Any, framework: str, base: Where, kills: int, seed: int) -> None:
    """Kill ``kills`` times on a seeded schedule; every run that ends must equal the reference.

    Each start writes asynchronously or not at random. A tenth of the kills land during the
    start itself (recovering from the previous kill); the rest a random number of epochs after
    the start, then a random fraction of an epoch or two later (inside a write, mostly).
    """
    reference = reference_run(context, framework, base.sub("reference"))
    rng = random.Random(seed)
    rounds, done, interrupted = 0, 0, 0
    where = base.sub("run-0")
    startup, epoch_time = 0.05, 0.05  # seconds; measured as the test goes
    while True:
        child = Child.training(context, framework, where, async_write=rng.random() < 0.75)
        started = time.monotonic()
        if done < kills and rng.random() < 0.1:
            time.sleep(rng.uniform(0.0, startup))
            assert child.kill(), "the run cannot have ended before it was told to go"
            done += 1
            interrupted += check_after_kill(where)
            continue
        message = child.receive()
        assert message is not None and message[0] == "ready", message
        startup = 0.8 * startup + 0.2 * (time.monotonic() - started)
        check_clean_start(where)
        child.go()
        if done >= kills:
            child.finish()
            assert_same_run(where, reference, framework)
            break
        target = message[1] + rng.randint(0, 10)
        delay = rng.uniform(0.0, 2.0)
        last_seen = time.monotonic()
        while (message := child.receive()) is not None and message[0] == "stepped":
            now = time.monotonic()
            epoch_time = 0.9 * epoch_time + 0.1 * (now - last_seen)
            last_seen = now
            if message[1] >= target:
                time.sleep(delay * epoch_time)
                if child.kill():
                    done += 1
                    interrupted += check_after_kill(where)
                    break
        else:
            # The run ended before its kill came: it must be the reference run; start another.
            child.finish(message)
            assert_same_run(where, reference, framework)
            rounds += 1
            where = base.sub(f"run-{rounds}")
    print(f"{framework}: {done} kills, {interrupted} inside a write, {rounds} runs ended between")
    # The schedule must have interrupted writes, or this test proves little.
    assert interrupted >= min(kills, 10) // 10, f"only {interrupted} of {kills} kills hit a write"


def test_killed_torch_training_loses_nothing_and_resumes_to_the_same_files(tmp_path, forkserver):
    kill_and_resume(forkserver, "torch", Where(str(tmp_path), {}), KILLS, SEED)


@pytest.mark.slow
def test_killed_torch_training_300_times(tmp_path, forkserver):
    kill_and_resume(forkserver, "torch", Where(str(tmp_path), {}), max(KILLS, 300), SEED + 1)


@pytest.mark.skipif(not lightning_works(), reason="bestsave.adapters.lightning is not importable")
def test_killed_lightning_training_loses_nothing_and_resumes_to_the_same_files(
    tmp_path, forkserver
):
    kill_and_resume(forkserver, "lightning", Where(str(tmp_path), {}), KILLS, SEED + 2)


@pytest.mark.slow
@pytest.mark.skipif(not lightning_works(), reason="bestsave.adapters.lightning is not importable")
def test_killed_lightning_training_300_times(tmp_path, forkserver):
    kill_and_resume(forkserver, "lightning", Where(str(tmp_path), {}), max(KILLS, 300), SEED + 4)


def test_killed_fresh_interpreters_resume(tmp_path):
    """The script run as users run it, a new interpreter each time, killed mid-run twice."""
    reference, run = Where(str(tmp_path / "reference"), {}), Where(str(tmp_path / "run"), {})
    command = [sys.executable, str(SCRIPTS / "kill_train.py"), "--epochs", "50"]
    subprocess.run([*command, reference.url], check=True, capture_output=True, timeout=300)
    for target in (15, 35):
        process = subprocess.Popen(
            [*command, run.url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("stepped") and int(line.split()[1]) >= target:
                break
        process.send_signal(signal.SIGKILL)
        process.wait(60)
        check_after_kill(run)
    subprocess.run([*command, run.url], check=True, capture_output=True, timeout=300)
    assert_same_run(run, reference, "torch")


# -- sharded runs: every rank writes its shards; one rank is killed, or all ------------------------

SHARDED_EPOCHS = 24
SHARDED_KILLS = max(3, 2 * KILLS // 3)  # a start costs two processes and a process group
WORLD = 2
VICTIMS = ([0], [1], [0, 1])  # in turn: rank 0 (the committer), rank 1, every rank
needs_sharding = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


class Ranks:
    """One start of the sharded run (``scripts/fsdp_torch.py``, resuming): both ranks, forked
    from the server, on a process group of their own. Leaving the ``with`` block SIGKILLs any
    rank still running, so none blocked in a collective with a dead peer outlives the test."""

    def __init__(self, context: Any, where: Where, out: Path) -> None:
        argv = [where.url, str(out), "--resume", "--epochs", str(where.epochs)]
        port = free_port()
        self.ranks = [
            Child(context, fsdp_torch.run_in_child, rank, WORLD, port, argv)
            for rank in range(WORLD)
        ]
        self.last: Any = None
        """The message that ended :meth:`stepped`."""

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.ranks:
            if child.process.exitcode is None:
                child.kill()

    def ready(self) -> list[dict[str, Any]]:
        """What each rank restored, once every rank has (the run then waits for :meth:`go`)."""
        facts = []
        for child in self.ranks:
            message = child.receive()
            assert message is not None and message[0] == "ready", message
            facts.append(message[2])
        return facts

    def go(self) -> None:
        for child in self.ranks:
            child.go()

    def stepped(self) -> Iterator[int]:
        """Each epoch rank 0 has evaluated (and started saving), as it goes."""
        while (message := self.ranks[0].receive()) is not None and message[0] == "stepped":
            yield message[1]
        self.last = message

    def kill(self, victims: list[int], grace: float) -> bool:
        """SIGKILL ``victims``; ``grace`` seconds later, as ``torchrun`` does once a rank has
        died, every rank left. False when the run had ended already."""
        killed = [self.ranks[rank].kill() for rank in victims]
        time.sleep(grace)
        self.__exit__()
        return any(killed)

    def finish(self, message: Any = None) -> list[dict[str, Any]]:
        """Wait for the run to end on every rank (``message``: rank 0's last one already
        received); returns each rank's report."""
        reports = []
        for child in self.ranks:
            while message is None or message[0] != "done":
                message = child.receive()
                assert message is not None, "a rank died before the run ended"
            reports.append(message[2])
            child.process.join(TIMEOUT)
            assert child.process.exitcode == 0, f"a rank exited {child.process.exitcode}"
            message = None
        return reports


def sharded_reference(context: Any, where: Where, out: Path) -> Where:
    out.mkdir()
    with Ranks(context, where, out) as ranks:
        ranks.ready()
        ranks.go()
        reports = ranks.finish()
    assert [(r["error"], r["best_weights_match"]) for r in reports] == [(None, True)] * WORLD
    return where


def check_sharded_after_kill(where: Where, out: Path, committed: int) -> tuple[bool, int]:
    """Nothing committed is lost, and the best loads on one process as the epoch's weights the
    run recorded. Returns whether the kill interrupted a save, and the last committed epoch (at
    least ``committed``, the one before the kill)."""
    interrupted = check_after_kill(where)  # every part of every record, the best's epoch
    if not where.has_run():
        assert committed == -1, "a committed run is gone"
        return interrupted, -1
    manifest = load_manifest(where.url)
    assert manifest.last is not None and manifest.last.epoch >= committed
    last = manifest.last.epoch
    best = load_best(where.url)
    assert best.epoch == best_until(last), "not the best of the committed epochs"
    recorded = torch.load(out / f"weights-{best.epoch}.pt")
    loaded = load_whole(fetch(best))["model"]
    assert loaded.keys() == recorded.keys()
    for key, value in recorded.items():
        assert torch.equal(loaded[key], value), f"{best.name}: {key} differs"
    return interrupted, last


def best_until(epoch: int) -> int:
    """The best epoch of the sharded run's first ``epoch + 1``: the first with the lowest score
    (a tie is no improvement)."""
    return min(range(epoch + 1), key=fsdp_torch.score)


def check_sharded_start(facts: list[dict[str, Any]], committed: int) -> None:
    """Every rank resumed after the last committed epoch with its weights, and loaded the best
    committed before the kill into a fresh model on the new process group."""
    for rank in facts:
        assert rank["restored"] == committed + 1
        if committed >= 0:
            assert rank["restored_weights_match"], "the restored weights are not the epoch's"
            best = (rank["resumed_best"], rank["resumed_best_weights_match"])
            assert best == (best_until(committed), True)


def kill_sharded_and_resume(context: Any, tmp_path: Path, kills: int, seed: int) -> None:
    """Kill ``kills`` times, in turn rank 0, rank 1 and both, at seeded random moments of
    sharded saves, then resume; every run that ends must equal the uninterrupted one.

    Every epoch saves (``last``, and the top 2 as they change) and the shard writers are the
    slower part, so a moment a random fraction of an epoch or two after rank 0 evaluates falls
    inside a save: capturing, writing shards, hashing, committing or renaming. A tenth of the
    kills land while a start recovers from the previous one.
    """
    reference = sharded_reference(
        context, Where(str(tmp_path / "reference"), {}, SHARDED_EPOCHS), tmp_path / "out-ref"
    )
    rng = random.Random(seed)
    out = tmp_path / "out"
    out.mkdir()
    rounds, done, interrupted = 0, 0, 0
    where = Where(str(tmp_path / "run-0"), {}, SHARDED_EPOCHS)
    committed = -1
    startup, epoch_time = 0.5, 0.1  # seconds; measured as the test goes
    while True:
        with Ranks(context, where, out) as ranks:
            victims, grace = VICTIMS[done % len(VICTIMS)], rng.uniform(0.0, 0.5)
            started = time.monotonic()
            if done < kills and rng.random() < 0.1:
                time.sleep(rng.uniform(0.0, startup))
                assert ranks.kill(victims, grace), "the run cannot have ended before it began"
                done += 1
                hit, committed = check_sharded_after_kill(where, out, committed)
                interrupted += hit
                continue
            facts = ranks.ready()
            startup = 0.8 * startup + 0.2 * (time.monotonic() - started)
            check_sharded_start(facts, committed)
            check_clean_start(where)
            ranks.go()
            if done >= kills:
                ranks.finish()
                assert_same_run(where, reference, "torch")
                break
            target = committed + 1 + rng.randint(0, 6)
            delay = rng.uniform(0.0, 2.0)
            last_seen = time.monotonic()
            for epoch in ranks.stepped():
                now = time.monotonic()
                epoch_time = 0.9 * epoch_time + 0.1 * (now - last_seen)
                last_seen = now
                if epoch >= target:
                    time.sleep(delay * epoch_time)
                    if ranks.kill(victims, grace):
                        done += 1
                        hit, committed = check_sharded_after_kill(where, out, committed)
                        interrupted += hit
                        break
            else:
                # The run ended before its kill came: it must be the reference run; start another.
                ranks.finish(ranks.last)
                assert_same_run(where, reference, "torch")
                rounds += 1
                where = Where(str(tmp_path / f"run-{rounds}"), {}, SHARDED_EPOCHS)
                committed = -1
    print(f"sharded: {done} kills, {interrupted} inside a save, {rounds} runs ended between")
    # Most kills land inside a save in a long run (67-85 of 100 here); in a short one, how many
    # do swings with the machine's load (3 to 8 of 10), so it only has to show that some do.
    least = kills // 3 if kills >= 50 else 2
    assert interrupted >= least, f"only {interrupted} of {kills} kills hit a save"


@needs_sharding
def test_killed_sharded_training_loses_nothing_and_resumes_to_the_same_files(tmp_path, forkserver):
    kill_sharded_and_resume(forkserver, tmp_path, SHARDED_KILLS, SEED + 5)


@pytest.mark.slow
@needs_sharding
def test_killed_sharded_training_100_times(tmp_path, forkserver):
    kill_sharded_and_resume(forkserver, tmp_path, max(SHARDED_KILLS, 100), SEED + 6)


# -- kills at one chosen instant, for the cases the random schedule hits only now and then ---------


def crash(dirpath: Path | str, point: str, options: dict[str, Any] | None = None) -> None:
    """Run ``scripts/crash_at.py``: a save that dies at ``point``."""
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "crash_at.py"),
            str(dirpath),
            point,
            json.dumps(options or {}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 9, result.stderr


def test_a_crash_between_the_commit_and_the_rename_leaves_the_committed_last_readable(tmp_path):
    """The manifest names epoch 2's ``last``; ``last`` on disk still holds epoch 1's bytes and
    the committed ones wait under their temporary name. Readers (``load_manifest``, ``fetch``,
    ``verify``) must find the committed bytes, not report the intact run as damaged."""
    crash(tmp_path, "after-commit")
    manifest = assert_intact(tmp_path)  # fetch() of every record, last included
    assert manifest.last.epoch == 2
    assert open(fetch(manifest.last)).read() == "epoch 2"
    assert crash_problems(tmp_path) == []
    BestSaver(tmp_path, monitor="val_loss", save_last=True, resume=True, trackers=()).close()
    assert [str(p) for p in verify(tmp_path)] == []
    assert (tmp_path / "last").read_text() == "epoch 2"


def test_a_crash_while_a_folder_replaces_another_leaves_nothing_the_next_start_misses(tmp_path):
    """A folder (a sharded ``last``) cannot be renamed over another: the old one is moved aside
    first, then deleted. A crash before it is gone must leave it where temporary files go, the
    run's folder, which the next start cleans; the checkpoint directory holds checkpoints."""
    crash(tmp_path, "replacing-a-folder")
    manifest = assert_intact(tmp_path)
    assert manifest.last.epoch == 1
    assert open(os.path.join(fetch(manifest.last), "weights")).read() == "epoch 1"
    assert crash_problems(tmp_path) == []
    assert [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)] == []
    BestSaver(tmp_path, monitor="val_loss", save_last=True, resume=True, trackers=()).close()
    assert leftovers(tmp_path) == []
    assert [str(p) for p in verify(tmp_path)] == []


def test_a_run_killed_before_its_first_commit_leaves_no_history_to_the_next_run(tmp_path):
    """The history line of an evaluation that was never committed must not become part of the
    run started next in the same directory."""
    crash(tmp_path, "before-first-commit")
    assert (run_folder(tmp_path, run_name(DEFAULT_TEMPLATE, "val_loss")) / HISTORY).exists()
    assert not runs_in(open_store(tmp_path))  # no manifest: the crash came before it
    saver = BestSaver(tmp_path, monitor="val_loss", save_last=True, resume=True, trackers=())
    saver.step(0, {"val_loss": 0.5}, write=lambda p: open(p, "w").write("epoch 0"))
    saver.close()
    assert [h["epoch"] for h in load_history(tmp_path)] == [0]
    assert [str(p) for p in verify(tmp_path)] == []
