"""Committing a save: write the new files, then the manifest, then rename and delete.

A :class:`Job` is everything one evaluation (or several merged ones) must make durable. The
:class:`Committer` carries it out, in the training thread or in the background worker, in the
order that keeps the previous best loadable at every instant:

1. each new file is written under a temporary name in the run's folder and made durable (hard
   links for files that hold the same bytes);
2. the history lines are appended;
3. the manifest that lists the new files and no longer lists the evicted ones replaces the old
   one (the commit point; it also names the temporary files, so a crash here is rolled forward);
4. the new files are renamed into place and their sidecars written;
5. the evicted files are deleted.

A run that replaces an earlier run of the same name writes nothing until its first file: the
earlier run stays whole until then, and its files are deleted as evicted ones are.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from bestsave.history import HistoryLine
from bestsave.jobs import Abandoned, Job, NewFile
from bestsave.layout import HISTORY, RunFiles
from bestsave.manifest import Manifest
from bestsave.plan import ordered
from bestsave.policy import Policy
from bestsave.record import Record
from bestsave.state import RunHeader, RunState
from bestsave.store import Parts, Store, path_digest, remove_local


class Committer:
    """Carries out jobs against a store, and remembers what is committed."""

    def __init__(
        self,
        store: Store,
        files: RunFiles,
        header: RunHeader,
        history_bytes: int,
        committed: RunState,
        policies: Mapping[str, Policy],
        *,
        keep_evaluations: bool = False,
        replacing: list[str] | None = None,
        replace_at: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.files = files
        self.header = header
        self.policies = policies
        self.keep_evaluations = keep_evaluations
        """A failed file write still records its evaluation (training goes on); otherwise the
        job is undone whole, so a resumed run repeats it."""
        self.replacing = replacing
        """The files of an earlier run this one replaces, deleted at this run's first commit
        (None when there is no earlier run)."""
        self.replace_at = replace_at
        """Kinds of file that the first commit must hold: until this run keeps one, it writes
        nothing, and the earlier run stays whole. Empty: the first job commits."""
        self.history_bytes = history_bytes
        self.committed = committed
        """The state the manifest on disk describes."""
        self.digests: dict[str, tuple[int, str]] = {}
        self.parts: dict[str, Parts] = {}
        """The parts of each new file that is a folder."""
        self.staging: dict[str, str] = {}
        """How each new file was staged in host memory."""
        self.lost: set[str] = set()
        """Files decided on but never written (a failed write): later manifests leave them
        out."""
        self.restored: dict[str, Record] = {}
        """Kept files a failed job would have evicted: they stay until a later job evicts
        them."""
        self._unfinished: dict[str, str] = {}
        """Renames a committed manifest asked for that failed; retried at the next job."""
        self._carry: list[HistoryLine] = []
        """History lines of a job whose commit failed, written with the next one."""

    def filled(self, record: Record) -> Record:
        """``record`` with its size and sha256, once its file is written."""
        digest = self.digests.get(record.name)
        if digest is None or record.sha256:
            return record
        parts = self.parts.get(record.name, {})
        staging = self.staging.get(record.name, "")
        return replace(record, bytes=digest[0], sha256=digest[1], parts=parts, staging=staging)

    def run(self, job: Job) -> tuple[list[Record], list[Record]]:
        """Make ``job`` durable; returns the records of the files it wrote and of those it
        deleted, with their sizes and checksums.

        A failed file write undoes the job, or with ``keep_evaluations`` loses only its files
        (and the evictions they caused) and records the evaluation, raising once that is
        committed. A failure before the manifest is written leaves the directory as it was
        (with ``keep_evaluations`` the history lines wait for the next job); one after it
        leaves the job committed, its renames finished by the next job or the next start.
        """
        assert job.state is not None
        if (
            self.replacing is not None
            and self.replace_at
            and not any(f.record.kind in self.replace_at for f in job.files)
        ):
            return self._defer(job)
        error: Exception | None = None
        digests = dict(self.digests)
        try:
            pending = self._write_files(job)
        except Abandoned:
            self.digests = digests
            raise
        except Exception as e:
            self._lose(job, digests)
            if not self.keep_evaluations:
                raise
            error, pending = e, {}
            lost = {f.record.name for f in job.files}
            job = Job(lines=[line.lost(lost, str(e)) for line in job.lines], state=job.state)
        evicting = self._commit(job, pending, digests)
        error = self._tidy(job, pending, evicting) or error
        if error is not None:
            raise error
        return [self.filled(f.record) for f in job.files], [self.filled(r) for r in job.evict]

    def _commit(
        self, job: Job, pending: dict[str, str], digests: dict[str, tuple[int, str]]
    ) -> list[str]:
        """Append the history and write the manifest: the commit point. Returns the files to
        delete once it is durable."""
        store, files, state = self.store, self.files, job.state
        assert state is not None
        lines, self._carry = [*self._carry, *job.lines], []
        text = "".join(line.to_json() for line in lines)
        history_bytes, replacing = self.history_bytes, self.replacing
        try:
            if replacing is not None:
                # The earlier run's history goes with its manifest: renamed in after the commit.
                pending[files.history] = files.tmp(HISTORY)
                store.write_text(pending[files.history], text)
                self.history_bytes = len(text.encode("utf-8"))
            elif text:  # merged jobs: one append, one fsync
                self.history_bytes = store.append_text(files.history, text)
            evicting = self._evicting(job, replacing or [])
            store.write_text(
                files.manifest, self._manifest(job, state, pending, evicting).to_json()
            )
        except BaseException as e:
            for tmp in pending.values():
                store.delete(tmp)
            pending.pop(files.history, None)
            if replacing is None:
                store.truncate(files.history, history_bytes)
            self.history_bytes = history_bytes
            lost = {f.record.name for f in job.files}
            if self.keep_evaluations:
                self._carry = [line.lost(lost, str(e)) for line in lines]
            self._lose(job, digests)
            raise
        self.lost -= set(pending)
        self.replacing = None
        for r in job.evict:
            self.restored.pop(r.name, None)
        self.committed = state
        return evicting

    def _tidy(self, job: Job, pending: dict[str, str], evicting: list[str]) -> OSError | None:
        """After the commit: rename the new files into place, write their records, delete the
        evicted. A failure here leaves the rest to the next job or the next start (the
        manifest names the temporary files); it is returned, not raised."""
        store, error = self.store, None
        self._unfinished.update(pending)
        for name, tmp in list(self._unfinished.items()):
            try:
                store.rename(tmp, name)
                del self._unfinished[name]
            except OSError as e:
                error = error or e
        for f in job.files:
            if f.record.kind != "last":
                store.write_text(self.files.sidecar(f.record.name), self.filled(f.record).to_json())
        for name in evicting:
            store.delete(name)
            self.digests.pop(name, None)
            self.parts.pop(name, None)
            self.staging.pop(name, None)
        store.sync()
        store.sync(self.files.folder)
        return error

    def _defer(self, job: Job) -> tuple[list[Record], list[Record]]:
        """A job of a run that replaces an earlier one and has kept no checkpoint yet: the
        earlier run stays whole. Its history waits for the first commit; a ``last`` file is
        not written (the earlier run's may be the one to resume); an exception's state is
        written into place, to be listed by that first commit."""
        self._carry += job.lines
        for f in job.files:
            if f.record.kind != "exception" and f.content is not None:
                f.content.release()
                f.content = None
        job.files = [f for f in job.files if f.record.kind == "exception"]
        pending = self._write_files(job)
        for name, tmp in pending.items():
            self.store.rename(tmp, name)
        self.store.sync()
        return [self.filled(f.record) for f in job.files], []

    def _write_files(self, job: Job) -> dict[str, str]:
        """Every new file under its temporary name, durable; returns final name -> temp."""
        store = self.store
        pending: dict[str, str] = {}
        current: NewFile | None = None
        try:
            for current in job.files:
                name = current.record.name
                content = current.content
                if content is not None:
                    local = content.materialize(store.scratch(current.tmp))
                    digest, parts = content.digest, content.parts
                    if digest is None:
                        if not os.path.exists(local):
                            raise FileNotFoundError(f"write() was given {local} but wrote no file")
                        digest, parts = path_digest(local)
                    self.digests[name], self.parts[name] = digest, parts
                    self.staging[name] = content.staging
                    store.publish(local, current.tmp)
                else:
                    twin = current.same_as or ""
                    store.link(pending[twin], current.tmp)
                    self.digests[name], self.parts[name] = self.digests[twin], self.parts[twin]
                    self.staging[name] = self.staging[twin]
                pending[name] = current.tmp
        except BaseException:
            if current is not None:  # the file being written when it failed, half there
                store.delete(current.tmp)
                remove_local(store.scratch(current.tmp))
            for tmp in pending.values():
                store.delete(tmp)
            raise
        finally:
            job.release()
        return pending

    def _lose(self, job: Job, digests: dict[str, tuple[int, str]]) -> None:
        """The job's files were never written: later manifests leave them out, and keep the
        files they would have evicted. ``digests`` are those from before the job: a file of
        the same name (a fixed file name) is still the one they describe."""
        self.digests = digests
        for r in job.evict:
            if r.name not in self.lost and r.kind != "last":
                self.restored[r.name] = self.filled(r)
        self.lost |= {f.record.name for f in job.files}

    def _evicting(self, job: Job, replacing: list[str]) -> list[str]:
        # A new file may reuse an evicted one's name (a fixed file name): the rename replaces
        # it, so it must not be deleted.
        side = self.files.sidecar
        reused = {n for f in job.files for n in (f.record.name, side(f.record.name))}
        evicted = [n for r in job.evict for n in (r.name, side(r.name))]
        return [n for n in dict.fromkeys(evicted + replacing) if n not in reused]

    def _manifest(
        self, job: Job, state: RunState, pending: dict[str, str], evicting: list[str]
    ) -> Manifest:
        lost = self.lost - set(pending)
        kept = [self.filled(r) for r in state.kept if r.name not in lost]
        gone = {r.name for r in job.evict} | {r.name for r in kept}
        kept = ordered([*kept, *(r for r in self.restored.values() if r.name not in gone)],
                       self.policies)  # fmt: skip
        policies = dict(state.policies)
        if lost:  # the rules' kept checkpoints are the files that exist
            policies = {n: p.reranked(policies[n], kept) for n, p in self.policies.items()}
        first = self.header.monitor
        best = self.policies[first].best(policies[first], kept)
        last = state.last
        if last is not None and last.name in lost:
            last = self.committed.last
        return Manifest(
            dirpath=self.store.url,
            run=self.header.run,
            monitor=first,
            mode=self.header.mode,
            monitors=self.header.monitors,
            policy=self.header.policy,
            kept=kept,
            best_name=best.name if best else None,
            last=self.filled(last) if last else None,
            state=replace(state, policies=policies).stored(self.history_bytes),
            pending={**self._unfinished, **pending},
            evicting=evicting,
            name=self.files.name,
        )

    def forget_lost(self, state: RunState) -> RunState:
        """``state`` without the records of files that were never written, and with the files
        a lost write would have evicted kept again; the best score, patience and history stay,
        so every rank keeps deciding alike."""
        restored = [r for r in self.restored.values() if r not in state.kept]
        if not self.lost and not restored:
            return state
        kept = ordered([*(r for r in state.kept if r.name not in self.lost), *restored],
                       self.policies)  # fmt: skip
        policies = {n: p.reranked(state.policies[n], kept) for n, p in self.policies.items()}
        last = state.last
        if last is not None and last.name in self.lost:
            last = self.committed.last
        return replace(state, kept=tuple(kept), policies=policies, last=last)
