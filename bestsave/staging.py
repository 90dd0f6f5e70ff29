"""Snapshots of training state in host memory, into buffers reused from one save to the next.

A background write must not read tensors that training keeps changing, so the training thread
copies them first. A fresh ``clone()`` pays for page faults on every save; a copy into memory
allocated beforehand costs only memory bandwidth. Two buffer sets alternate so a snapshot never
overwrites the one a write in flight is still reading: the first snapshot allocates one set,
and a helper thread allocates and touches the second while training goes on. The buffers stay
within a memory budget; a state too large for two sets steps down to one, then to writing from
the live state (:mod:`bestsave.memory`).

Tensors may be torch tensors (of a ``DTensor`` or a ``ShardedTensor``, each process copies its
own shards) or numpy arrays (Keras hands over the latter on backends other than torch); neither
library is imported here, only used when the state holds its arrays.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from bestsave.memory import LIVE, Budget, Staging, parse_size
from bestsave.messages import warn


class Stager:
    """Copies nested state (dicts, lists, tuples of tensors and plain values) into host buffers,
    within a memory budget (``staging_memory``: bytes, a size such as ``"8GB"``, or None for
    half the memory available at the first snapshot; see :mod:`bestsave.memory`).

    >>> import torch
    >>> stager = Stager()
    >>> w = torch.ones(3)
    >>> snap = stager.snapshot({"model": {"w": w}, "epoch": 2})
    >>> _ = w.add_(1)
    >>> snap.state["model"]["w"].tolist(), snap.state["epoch"], snap.staging
    ([1.0, 1.0, 1.0], 2, 'two sets')
    >>> snap.release()

    A state that does not fit in the budget is not copied: the snapshot holds the live state
    (``snap.live``), to be written before training goes on.

    >>> Stager(staging_memory=8).snapshot({"w": w}).staging
    'streaming'
    """

    def __init__(self, staging_memory: int | str | None = None) -> None:
        parse_size(staging_memory)  # a bad value fails now, not at the first save
        self._staging_memory = staging_memory
        self._budget: Budget | None = None
        self._slots: list[dict[tuple[Any, ...], Any]] = [{}, {}]
        self._busy = [False, False]
        self._handed = [False, False]  # the busy slot's snapshot is with a writer
        self._taken = [0, 0]  # snapshots taken into each slot so far
        self._cond = threading.Condition()
        self._warming: threading.Thread | None = None
        self._told: set[str] = set()

    @property
    def budget(self) -> Budget:
        """The memory the buffers may take, fixed when training starts (the first
        :meth:`reserve` or :meth:`snapshot`)."""
        if self._budget is None:
            self._budget = Budget.of(self._staging_memory)
        return self._budget

    def snapshot(self, state: Any) -> Snapshot:
        """A copy of ``state`` whose tensors live in this stager's host buffers, or, when it
        does not fit in the budget, ``state`` itself (``live``).

        The buffers stay reserved until :meth:`Snapshot.release` (the saver calls it once the
        snapshot is written or dropped). With room for one copy only, a snapshot waits for the
        write of the one before it, once that was handed to a writer
        (:meth:`Snapshot.hand_over`).
        """
        if self._warming is not None:
            self._warming.join()
            self._warming = None
        like: dict[tuple[Any, ...], Any] = {}
        _tensors(state, (), like)
        size = sum(int(t.nbytes) for t in like.values())
        pinned = any(getattr(t, "is_cuda", False) for t in like.values())
        step = self.budget.step(size, pinned)
        slot = None if step in LIVE else self._take_slot(self.budget.sets(size, pinned))
        if slot is None and step not in LIVE:
            step = "streaming"  # this save's own snapshots hold every buffer
        if step != "two sets" and step not in self._told:
            self._told.add(step)
            warn(self.budget.describe(step, size, pinned))
        if slot is None:
            live = self._copy(state, (), None, _Sync())  # detached, as copies are
            room = self.budget.room(pinned)
            return Snapshot(live, _nothing, _never, staging=step, live=True, spool=room)
        taken = self._taken[slot]
        sync = _Sync()
        try:
            value = self._copy(state, (), self._slots[slot], sync)
            sync.wait()
        except BaseException:
            self._release(slot)
            raise
        if step == "two sets" and (sync.allocated or not all(self._slots[:2])):
            self._warm_spare(slot)
        return Snapshot(
            value,
            partial(self._release, slot),
            lambda: self._taken[slot] == taken,
            lambda: [_span(b) for b in self._slots[slot].values()],
            staging=step,
            hand_over=partial(self._hand_over, slot),
        )

    def reserve(self, state: Any) -> None:
        """Allocate buffers for ``state``'s tensors, laid out as :meth:`snapshot` would copy
        them, in a helper thread with pages touched, so that even the first snapshot is a copy
        only. Nothing is copied; call it when training starts, with the tensors (or a part of
        them) the snapshots will hold. Does nothing once buffers exist, or when the tensors do
        not fit in the budget.
        """
        if self._warming is not None or any(self._slots):
            return
        like: dict[tuple[Any, ...], Any] = {}
        _tensors(state, (), like)
        size = sum(int(t.nbytes) for t in like.values())
        if self.budget.step(size, any(getattr(t, "is_cuda", False) for t in like.values())) in LIVE:
            return
        self._warming = _helper(self._slots[0], like)
        self._warming.start()

    def _warm_spare(self, slot: int) -> None:
        """Give another slot buffers like ``slot``'s, in a helper thread, pages touched, so the
        next snapshot costs a copy only. The next :meth:`snapshot` waits for it."""
        layout = dict(self._slots[slot])
        with self._cond:
            # Never a slot a write is reading: its buffers (and their list) must stay as they are.
            free = (i for i in range(2) if i != slot and not self._busy[i])
            spare = next(free, None)
        if spare is None:
            return
        self._warming = _helper(self._slots[spare], layout)
        self._warming.start()

    def _take_slot(self, sets: int) -> int | None:
        """A free slot among the first ``sets`` (allocated as needed), once one is free: a
        write in flight frees one. None when the snapshots holding them are not with a writer
        yet (this save's own), and so would never be freed while it waits."""
        with self._cond:
            while len(self._slots) < sets and all(self._busy):
                self._slots.append({})
                self._busy.append(False)
                self._handed.append(False)
                self._taken.append(0)
            for i in range(sets, len(self._slots)):
                if not self._busy[i]:  # a state grown past the budget: free what it cannot use
                    self._slots[i] = {}
            while True:
                free = [i for i in range(min(sets, len(self._slots))) if not self._busy[i]]
                if free:
                    # A free slot that already holds buffers costs no allocation.
                    slot = min(free, key=lambda i: not self._slots[i])
                    self._busy[slot] = True
                    self._taken[slot] += 1
                    return slot
                if not any(h for b, h in zip(self._busy, self._handed, strict=True) if b):
                    return None
                self._cond.wait()

    def _hand_over(self, slot: int) -> None:
        with self._cond:
            self._handed[slot] = True

    def _release(self, slot: int) -> None:
        with self._cond:
            self._busy[slot] = self._handed[slot] = False
            self._cond.notify_all()

    def _copy(
        self,
        obj: Any,
        path: tuple[Any, ...],
        buffers: dict[tuple[Any, ...], Any] | None,
        sync: _Sync,
    ) -> Any:
        torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._copy_tensor(obj, path, buffers, sync)
        if np is not None and isinstance(obj, np.ndarray):
            if buffers is None:
                return obj
            buf = buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = buffers[path] = np.empty(obj.shape, obj.dtype)
                sync.allocated = True
            np.copyto(buf, obj)
            return buf
        if isinstance(obj, dict):
            out: Any = type(obj)() if type(obj) is not dict else {}
            for k, v in obj.items():
                out[k] = self._copy(v, (*path, k), buffers, sync)
            metadata = getattr(obj, "_metadata", None)  # a state_dict's versions, for loading
            if metadata is not None:
                out._metadata = metadata
            return out
        if isinstance(obj, (list, tuple)):
            items = [self._copy(v, (*path, i), buffers, sync) for i, v in enumerate(obj)]
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
                return type(obj)(*items)
            return type(obj)(items)
        return obj

    def _copy_tensor(
        self,
        t: Any,
        path: tuple[Any, ...],
        buffers: dict[tuple[Any, ...], Any] | None,
        sync: _Sync,
    ) -> Any:
        import torch

        dtensor = _dtensor_class()
        if dtensor is not None and isinstance(t, dtensor):
            # A shard of a sharded tensor: this process copies its own part, and the copy
            # keeps the sharding, so that a sharded checkpoint writes it where it belongs.
            local = self._copy_tensor(t.to_local(), path, buffers, sync)
            return dtensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                      shape=t.shape, stride=t.stride())  # fmt: skip
        sharded = _sharded_tensor_class()
        if sharded is not None and isinstance(t, sharded):
            # FSDP1's sharded state dicts: the same, for each of this process's shards.
            from torch.distributed._shard.sharded_tensor import Shard

            shards = [
                Shard(self._copy_tensor(s.tensor, (*path, i), buffers, sync), s.metadata)
                for i, s in enumerate(t.local_shards())
            ]
            return sharded._init_from_local_shards_and_global_metadata(
                shards, t.metadata(), process_group=t._process_group
            )
        if buffers is None:  # no room for a copy: training's own tensor, without autograd
            return t.detach()
        if t.layout != torch.strided:
            return t.detach().to("cpu", copy=True)
        buf = buffers.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            buffers[path] = buf
            sync.allocated = True
        with torch.no_grad():
            buf.copy_(t.detach(), non_blocking=t.device.type == "cuda")
        if t.device.type == "cuda":
            sync.cuda = True
        return buf


class Snapshot:
    """Captured state, and the release of the buffers that hold it."""

    def __init__(
        self,
        state: Any,
        release: Callable[[], None],
        intact: Callable[[], bool],
        spans: Callable[[], list[tuple[int, int]]] = list,
        *,
        staging: Staging = "two sets",
        live: bool = False,
        hand_over: Callable[[], None] = lambda: None,
        spool: int = 0,
    ) -> None:
        self.state = state
        self.staging = staging
        """How this snapshot is written (:data:`bestsave.memory.Staging`)."""
        self.live = live
        """``state`` is training's own, not a copy: write it before training goes on."""
        self.hand_over = hand_over
        """Called when a writer takes the snapshot: a later snapshot may then wait for it."""
        self.spool = spool
        """For a chunked write: the bytes of it that may wait in memory."""
        self._release: Callable[[], None] | None = release
        self._intact = intact
        self._spans = spans

    def release(self) -> None:
        """Free the buffers for the next snapshot; later calls do nothing."""
        release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def intact(self) -> bool:
        """Whether the buffers still hold this snapshot: released buffers keep it until the
        next snapshot reuses them."""
        return self._intact()

    def spans(self) -> list[tuple[int, int]]:
        """``(address, size)`` of the host buffers that hold this snapshot's tensors; they stay
        unchanged until :meth:`release`."""
        return self._spans()


def _nothing() -> None:
    pass


def _never() -> bool:
    return False


def _span(buffer: Any) -> tuple[int, int]:
    """Where a host buffer (a torch tensor or a numpy array) lies in memory."""
    storage = getattr(buffer, "untyped_storage", None)
    if storage is not None:
        return storage().data_ptr(), storage().nbytes()
    return buffer.ctypes.data, buffer.nbytes


def _tensors(obj: Any, path: tuple[Any, ...], out: dict[tuple[Any, ...], Any]) -> None:
    """The tensors and arrays in ``obj`` that :meth:`Stager.snapshot` copies into buffers, by
    the path it files them under."""
    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
    dtensor = _dtensor_class()
    sharded = _sharded_tensor_class()
    if dtensor is not None and isinstance(obj, dtensor):
        out[path] = obj.to_local()
    elif sharded is not None and isinstance(obj, sharded):
        for i, shard in enumerate(obj.local_shards()):
            out[(*path, i)] = shard.tensor
    elif torch is not None and isinstance(obj, torch.Tensor):
        if obj.layout == torch.strided:
            out[path] = obj
    elif np is not None and isinstance(obj, np.ndarray):
        out[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, (*path, k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, (*path, i), out)


def _dtensor_class() -> Any:
    """torch's ``DTensor``, when a sharded model has loaded it; else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _sharded_tensor_class() -> Any:
    """torch's ``ShardedTensor`` (FSDP1's sharded state dicts), when loaded; else None."""
    return getattr(sys.modules.get("torch.distributed._shard.sharded_tensor"), "ShardedTensor",
                   None)  # fmt: skip


def _helper(
    buffers: dict[tuple[Any, ...], Any], like: dict[tuple[Any, ...], Any]
) -> threading.Thread:
    """A thread that runs :func:`_allocate`. Not a daemon: the interpreter waits for it at exit,
    since one stopped inside torch's allocation aborts the process."""
    return threading.Thread(target=_allocate, args=(buffers, like), name="bestsave-stager")


def _allocate(buffers: dict[tuple[Any, ...], Any], like: dict[tuple[Any, ...], Any]) -> None:
    """Host buffers shaped as ``like``'s, in ``buffers``, with every page already faulted in;
    pinned for tensors on (or staged from) a GPU."""
    torch = sys.modules.get("torch")
    for path, ref in like.items():
        buf = buffers.get(path)
        if buf is not None and buf.shape == ref.shape and buf.dtype == ref.dtype:
            continue
        if torch is not None and isinstance(ref, torch.Tensor):
            pinned = ref.is_cuda or ref.is_pinned()
            buf = torch.empty(ref.shape, dtype=ref.dtype, pin_memory=pinned).zero_()
        else:
            buf = sys.modules["numpy"].empty(ref.shape, ref.dtype)
            buf.fill(0)
        buffers[path] = buf


class _Sync:
    """Waits once for all non-blocking device-to-host copies of one snapshot, and notes
    whether it allocated buffers."""

    def __init__(self) -> None:
        self.cuda = False
        self.allocated = False

    def wait(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
