"""Plain PyTorch: a checkpointer for hand-written training loops.

Example:
    >>> import os, tempfile, torch
    >>> from bestsave.adapters.torch import TorchCheckpointer
    >>> model = torch.nn.Linear(3, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> ckpt = TorchCheckpointer(tempfile.mkdtemp(), monitor="val_loss", save_last=True)
    >>> start = ckpt.restore(model, optimizer)          # 0 for a new run
    >>> for epoch in range(start, 3):
    ...     metrics = {"val_loss": [0.5, 0.3, 0.4][epoch], "train_loss": 0.1}
    ...     _ = ckpt.step(epoch, metrics, model=model, optimizer=optimizer)
    >>> ckpt.close()
    >>> ckpt.load_best(model).epoch
    1
    >>> sorted(os.listdir(ckpt.dirpath))  # the checkpoints; the run's own files in .bestsave/
    ['.bestsave', 'epoch=001-val_loss=0.3000.pth', 'last.pth']
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Literal

import torch

from bestsave import BestSaver, Decision, Record, Sharded, Staged, fetch, load_manifest
from bestsave.hashing import HashedFolder
from bestsave.layout import runs_in
from bestsave.messages import warn
from bestsave.staging import Stager
from bestsave.store import Parts, open_store, tmp_name

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from bestsave.options import CoreOptions

__all__ = ["Terminated", "TorchCheckpointer", "export"]


class Terminated(Exception):
    """Raised in the training loop when the process receives SIGTERM inside ``with ckpt:``."""


def global_rank() -> int:
    """This process's rank under ``torch.distributed`` (or ``RANK``), 0 when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", 0))


def export(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Write a ``TorchCheckpointer`` checkpoint as one file on this process: a sharded one (a
    ``torch.distributed.checkpoint`` folder) is consolidated. ``output`` ending in
    ``.safetensors`` gets the model's weights (its ``model`` or ``state_dict`` entry, as a
    Lightning checkpoint holds them); any other name ``torch.save`` of the whole
    checkpoint (model, optimiser, epoch...). What ``bestsave export`` runs.
    """
    source, target = os.fspath(checkpoint), os.fspath(output)
    folder = os.path.dirname(os.path.abspath(target))
    tmp = os.path.join(folder, tmp_name(os.path.basename(target)))
    whole = tmp + ".pt"  # torch.load reads a name ending in .safetensors as safetensors
    try:
        if os.path.isdir(source):
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(source, whole)
        else:
            shutil.copyfile(source, whole)
        if target.endswith(".safetensors"):
            from safetensors.torch import save_file

            state = torch.load(whole, map_location="cpu", weights_only=True)
            weights = state.get("model", state.get("state_dict"))  # ours and FSDP; Lightning's
            if not isinstance(weights, dict):
                raise ValueError(
                    f"{source} holds no model weights under 'model' or 'state_dict' "
                    f"(it holds {sorted(state)}); export it to a .pth file instead"
                )
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp)
        else:
            os.replace(whole, tmp)
        os.replace(tmp, target)
    finally:
        for path in (tmp, whole):
            if os.path.exists(path):
                os.unlink(path)


def _sharded_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model's (and optimiser's) state as ``DTensor`` shards, keyed by parameter name, as
    ``torch.distributed.checkpoint`` saves and reshards them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, [optimizer] if optimizer else [])
    return model_state, optimizer_state if optimizer is not None else None


def save_shards(
    state: dict[str, Any], where: str, group: ShardGroup, storage_options: dict[str, Any]
) -> Parts | None:
    """Write this process's shards of ``state`` into the folder ``where`` (a path or URL).
    Returns the size and sha256 of each file this process wrote into a local folder, hashed as
    it was written (around the page cache where the filesystem allows, each file durable once
    closed); None for a remote one."""
    import torch.distributed.checkpoint as dcp

    folder: HashedFolder | None = None
    if "://" in where:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer: Any = FsspecWriter(where, **storage_options)
    else:
        folder = HashedFolder(where)
        # Every file is made durable as it closes, after its last block: DCP's own fsync would
        # come before the last block of a file written around the page cache.
        writer = dcp.FileSystemWriter(where, sync_files=False)
        writer.fs = _hashing_filesystem(folder)
    try:
        dcp.save(state, storage_writer=writer, process_group=group.pg)
    except dcp.api.CheckpointException as e:  # every process's tracebacks: say what failed here
        causes = {rank: failure[0] for rank, failure in e.failures.items()}
        mine = causes.get(group.rank)
        others = ", ".join(str(rank) for rank in sorted(causes))
        raise (mine or RuntimeError(f"the write failed on rank {others}")) from None
    return folder.parts() if folder is not None else None


def _hashing_filesystem(folder: HashedFolder) -> Any:
    """DCP's local filesystem, with every file it writes hashed as it is written by ``folder``."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class HashingFileSystem(FileSystem):
        @contextlib.contextmanager
        def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
            if mode != "wb":
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with folder.create(path) as f:
                yield f

        def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
            super().rename(path, new_path)
            folder.renamed(path, new_path)

    return HashingFileSystem()


class ShardGroup:
    """The processes of a sharded run, over a process group of their own (gloo), so that the
    background writes never share a collective stream with training."""

    def __init__(self) -> None:
        self.pg: Any = torch.distributed.new_group(backend="gloo")
        self.rank = torch.distributed.get_rank()
        self.size = torch.distributed.get_world_size()
        atexit.register(self._free)

    def _free(self) -> None:
        """Free the group before the interpreter shuts down: a gloo group still alive then
        (kept by this object after ``destroy_process_group()``) is destroyed while the
        interpreter tears down, and aborts the process ("terminate called without an active
        exception")."""
        pg, self.pg = self.pg, None
        if pg is not None and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):  # already destroyed with all the others
                torch.distributed.destroy_process_group(pg)

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.pg)  # type: ignore[arg-type]
        return out


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ``DTensor`` shards (FSDP2's ``fully_shard``, tensor
    parallelism): then every process saves its own part."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class TorchCheckpointer:
    """Keeps the best checkpoints of a plain PyTorch loop.

    Takes every option of :class:`bestsave.BestSaver` (described on
    :class:`bestsave.SaverOptions`), with the same meaning: a directory holding an earlier run
    of the same name is an error (:class:`bestsave.RunExistsError`) unless ``resume=True``
    continues it or ``overwrite=True`` replaces it (its files stay until this run keeps its
    first one). Kept files go to ``dirpath``; the run's manifest, history and records to
    ``dirpath/.bestsave/<name>/``. Plus:

    Args:
        save_weights_only: Kept files hold the model's ``state_dict`` alone; ``last`` still holds
            the full training state. By default kept files hold the full state too, so that
            ``last`` can be a hard link to the best instead of a second copy.
        format: ``"torch"`` (``torch.save``, ``.pth``) or ``"safetensors"`` (kept files hold the
            model's weights as ``.safetensors``; needs the ``safetensors`` package and no
            ``save_last``, which holds more than tensors).
        rank: This process's global rank; only rank 0 writes. Read from ``torch.distributed``
            (or the ``RANK`` variable) when not given.
        hparams: Hyperparameters recorded with every checkpoint.

    A ``torch`` checkpoint is ``torch.save`` of a dict: ``model``, ``optimizer`` and
    ``scheduler`` state dicts, ``epoch``, ``step`` and the torch RNG state, so it loads with
    ``torch.load(weights_only=True)``. Saving costs the loop one copy of that state into host
    buffers reused from save to save; ``torch.save`` and the write run in the background.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        monitor: str | Sequence[str],
        mode: str | Sequence[str] = "auto",
        *,
        save_weights_only: bool = False,
        format: Literal["torch", "safetensors"] = "torch",
        rank: int | None = None,
        hparams: Mapping[str, Any] | None = None,
        **options: Unpack[CoreOptions],
    ) -> None:
        if format not in ("torch", "safetensors"):
            raise ValueError(f"format must be 'torch' or 'safetensors', not {format!r}")
        if format == "safetensors":
            import safetensors.torch  # noqa: F401 - fail here, not at the first save

            if options.get("save_last"):
                raise ValueError(
                    "save_last keeps the optimizer and loop state, which safetensors cannot "
                    "hold: use format='torch' to resume, or save_last=False"
                )
        self.format = format
        self.extension = ".safetensors" if format == "safetensors" else ".pth"
        self.rank = global_rank() if rank is None else int(rank)
        self.save_weights_only = save_weights_only or format == "safetensors"
        self.saver = BestSaver(
            dirpath,
            monitor,
            mode,
            extension=self.extension,
            writer=self.rank == 0,
            framework="torch",
            hparams=hparams,
            **options,
        )
        storage_options = self.saver.options.storage_options
        resume = self.saver.options.resume
        self._storage_options = dict(storage_options or {})
        self._resume = resume
        self._objects: dict[str, Any] = {}
        self._stager = Stager(self.saver.options.staging_memory)
        self._epoch = -1
        self._step: int | None = None
        self._previous_handler: Any = None
        self._group: ShardGroup | None = None
        """The processes writing a sharded model's checkpoints, once one is seen."""

    # -- what the saver knows -------------------------------------------------------------

    @property
    def best(self) -> Record | None:
        return self.saver.best

    def best_for(self, monitor: str) -> Record | None:
        """The best checkpoint by one of several monitors."""
        return self.saver.best_for(monitor)

    @property
    def kept(self) -> list[Record]:
        return self.saver.kept

    @property
    def should_stop(self) -> bool:
        return self.saver.should_stop

    @property
    def dirpath(self) -> str:
        return self.saver.dirpath

    # -- training ---------------------------------------------------------------------------

    def _state(self, weights_only: bool) -> dict[str, Any]:
        model = self._objects.get("model")
        if model is None:
            raise ValueError("pass model= to step() so there is something to save")
        optimizer = None if weights_only else self._objects.get("optimizer")
        if self._group is not None:
            model_state, optimizer_state = _sharded_state(model, optimizer)
        else:
            model_state = model.state_dict()
            optimizer_state = optimizer.state_dict() if optimizer is not None else None
        state: dict[str, Any] = {"model": model_state, "epoch": self._epoch, "step": self._step}
        if optimizer_state is not None:
            state["optimizer"] = optimizer_state
        if not weights_only:
            if self._objects.get("scheduler") is not None:
                state["scheduler"] = self._objects["scheduler"].state_dict()
            if self._group is None:  # each process has its own; a sharded file has one
                state["rng"] = torch.get_rng_state()
        return state

    def _writer(self, weights_only: bool) -> Staged | Sharded:
        # The training thread pays for a copy into reused host buffers; serialising and writing
        # run in the saver's background thread.
        def capture() -> Any:
            return self._stager.snapshot(self._state(weights_only))

        if self._group is not None:
            group = self._group
            return Sharded(capture, lambda snap, where: save_shards(snap.state, where, group,
                                                                      self._storage_options),
                           group)  # fmt: skip
        if self.format == "safetensors":
            from safetensors.torch import save_file

            def serialize(snapshot: Any, path: str) -> None:
                meta = {"epoch": str(snapshot.state["epoch"]), "step": str(snapshot.state["step"])}
                save_file(snapshot.state["model"], path, metadata=meta)

            return Staged(capture, serialize)
        return Staged(capture, lambda snapshot, f: torch.save(snapshot.state, f), stream=True)

    def step(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        step: int | None = None,
    ) -> Decision:
        """Judge epoch ``epoch`` by ``metrics`` and keep its state if the policy says so."""
        for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
            if obj is not None:
                self._objects[key] = obj
        self._shard_if_needed()
        self._epoch, self._step = int(epoch), step
        return self.saver.step(
            epoch,
            metrics,
            write=self._writer(self.save_weights_only),
            step=step,
            write_last=self._writer(False) if self.save_weights_only else None,
        )

    def _shard_if_needed(self) -> None:
        """A sharded model is saved by every process (a collective: every process calls
        ``step`` with it, as training does)."""
        model = self._objects.get("model")
        if self._group is not None or model is None or not is_sharded(model):
            return
        if self.format != "torch":
            raise ValueError(
                "a sharded model is saved as torch.distributed.checkpoint folders: use "
                "format='torch', and 'bestsave export' for one safetensors file"
            )
        self._group = ShardGroup()

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        map_location: Any = "cpu",
    ) -> int:
        """Load the ``last`` checkpoint of a resumed run; returns the next epoch to run (0 when
        there is nothing to resume)."""
        self._objects.update(model=model, optimizer=optimizer, scheduler=scheduler)
        last = self.saver.last
        if last is None:
            if self.saver.last_epoch is not None:
                warn(
                    f"the run in {self.dirpath} has no 'last' checkpoint to resume from "
                    "(save_last=False); training restarts at epoch 0, its best is kept"
                )
            elif self._resume and self.rank == 0:
                self._warn_other_runs()
            return 0
        self._shard_if_needed()
        if last.parts:
            self._load_folder(last, model, optimizer, scheduler)
            state: dict[str, Any] = {"epoch": last.epoch, "step": last.step}
        else:
            state = self._load(last, map_location)
            model.load_state_dict(state["model"])
            if optimizer is not None and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and "scheduler" in state:
                scheduler.load_state_dict(state["scheduler"])
            if "rng" in state:
                torch.set_rng_state(state["rng"])
        # An exception before the first step() keeps the restored state: it is this epoch's.
        self._epoch, self._step = int(state["epoch"]), state.get("step")
        return int(state["epoch"]) + 1

    def _warn_other_runs(self) -> None:
        """resume=True found no run of this name to continue: say so when the directory holds
        others (a changed ``filename`` or ``monitor`` names the run differently)."""
        name = self.saver.files.name
        others = [
            r for r in runs_in(open_store(self.dirpath, **self._storage_options)) if r != name
        ]
        if others:
            warn(
                f"resume=True: {self.dirpath} holds no run named {name!r} to resume, but holds "
                f"{', '.join(map(repr, others))}; training starts at epoch 0 as a new run. "
                f"Runs are named after their file name template and monitor: pass the same "
                f"filename= and monitor= (or name={others[0]!r}) to resume that one"
            )

    def _load(self, record: Record, map_location: Any) -> dict[str, Any]:
        path = fetch(record, **self._storage_options)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            device = map_location if isinstance(map_location, str) else "cpu"
            return {"model": load_file(path, device=device), "epoch": record.epoch}
        state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{record.path} is not a TorchCheckpointer checkpoint")
        return state

    def _load_folder(
        self,
        record: Record,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> None:
        """Load a sharded checkpoint into ``model`` (and the optimiser and scheduler): each
        process reads the parts its shards need, whatever the number of processes that wrote
        it (``torch.distributed.checkpoint`` reshards). Every process of a distributed run
        calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = fetch(record, **self._storage_options)
        model_state, optimizer_state = get_state_dict(model, [optimizer] if optimizer else [])
        state: dict[str, Any] = {"model": model_state}
        if optimizer is not None:
            state["optimizer"] = optimizer_state
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        group = self._group.pg if self._group is not None else None
        alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with warnings.catch_warnings():  # loading on one process is what is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, checkpoint_id=path, process_group=group, no_dist=alone)
        set_state_dict(model, [optimizer] if optimizer else [], model_state_dict=state["model"],
                       optim_state_dict=state.get("optimizer", {}))  # fmt: skip
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])

    def load(
        self, record: Record, model: torch.nn.Module | None = None, *, map_location: Any = "cpu"
    ) -> dict[str, Any]:
        """The checkpoint of ``record``, verified and loaded with ``weights_only=True``; its
        weights are loaded into ``model`` when given.

        A sharded checkpoint (a folder) is loaded into ``model`` (required), sharded or not,
        on any number of processes; every process calls this."""
        if record.parts:
            if model is None:
                raise ValueError(
                    f"{record.name} is a sharded checkpoint: pass the model to load it into, "
                    "or make one file of it with 'bestsave export'"
                )
            self._load_folder(record, model)
            return {"model": model.state_dict(), "epoch": record.epoch, "step": record.step}
        state = self._load(record, map_location)
        if model is not None:
            model.load_state_dict(state["model"])
        return state

    def load_best(self, model: torch.nn.Module, *, map_location: Any = "cpu") -> Record:
        """Load the best epoch's weights into ``model``; returns its record.

        Waits for pending writes first. When the best was the latest save, its weights come
        from the copy still in memory instead of the file.
        """
        self.saver.close()
        best = self.saver.best
        if self.rank != 0:  # the committed record, with its checksums
            best = load_manifest(
                self.dirpath, run=self.saver.files.name, **self._storage_options
            ).best
        if best is None:
            raise FileNotFoundError(f"no best checkpoint has been kept in {self.dirpath} yet")
        self._objects.setdefault("model", model)
        self._shard_if_needed()
        held = self.saver.held_state(best) if self._group is None else None
        if held is not None:  # the latest save, still in memory: no need to read the file back
            model.load_state_dict(held["model"])
        else:
            self.load(best, model, map_location=map_location)
        return best

    def close(self) -> None:
        """Wait for pending writes and tell trackers the best. Safe to call more than once."""
        self.saver.close()

    # -- exceptions and SIGTERM -----------------------------------------------------------------

    def __enter__(self) -> TorchCheckpointer:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        raise Terminated("received SIGTERM")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        try:
            if exc_type is not None and "model" in self._objects:
                self.saver.save_exception(
                    max(self._epoch, 0),
                    self._writer(False),
                    step=self._step,
                    metrics={"exception": f"{exc_type.__name__}: {exc}"},
                )
        finally:
            self.close()
