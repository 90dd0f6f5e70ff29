"""One benchmark configuration, run in a fresh process: ``python workloads.py '<spec as JSON>'``.

The spec names a framework (``torch``, ``lightning``, ``keras``, ``fastai``, ``fsdp``, or
``limit``), a configuration (``none``: no checkpoint callback; ``theirs``: the framework's own;
``theirs_async``: its asynchronous one, for ``fsdp`` ``dcp.async_save``; ``ours``: bestsave's,
with the same settings; ``limit``, for ``fsdp``: the copy of each process's shards), the model
size, the epochs and where to write. ``fsdp`` runs on two processes, which this one starts. The
result, a JSON object, goes to ``spec["result"]``:

- ``fit_s``: wall time of the fit call, including the final wait for pending writes;
- ``cpu_s``: CPU time the process spent in that time, every thread's;
- ``epochs``: per epoch, ``[start, trained, end]`` clock readings: ``trained`` is when the
  epoch's training (and validation) finished, ``end`` when the next epoch started (or training
  ended), so ``end - trained`` is the pause at the epoch's end, where checkpoint callbacks run;
- ``saves``: the epochs whose score improved (those where a best is saved);
- ``hwm_mb``: the process's peak resident memory (``VmHWM``) when the last epoch ended.

Every framework trains the same model (``layers`` square ``Linear``/``Dense`` layers) with plain
SGD on the same few random samples, and logs the same scripted metric, ``scripted_loss``, which
improves at epochs 0, 1, 2, 4, 7, 11, 16, ... (six saves in 12 epochs).

Example (a model of a few kilobytes, in this process)::

    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> spec = dict(framework="torch", config="ours", layers=2, width=8, epochs=3, samples=4,
    ...             batch=2, dir=os.path.join(d, "ckpt"), result=os.path.join(d, "r.json"))
    >>> run(spec)
    >>> r = json.load(open(spec["result"]))
    >>> r["saves"], len(r["epochs"]), sorted(os.listdir(spec["dir"]))  # the best, and .bestsave
    ([0, 1, 2], 3, ['.bestsave', 'epoch=002-scripted_loss=97.0000.pth'])
    >>> run_folder = os.path.join(spec["dir"], ".bestsave", "epoch=epoch-scripted_loss=score")
    >>> sorted(os.listdir(run_folder))  # the run's own files
    ['bestsave.json', 'epoch=002-scripted_loss=97.0000.json', 'history.jsonl']
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

MONITOR = "scripted_loss"


def improves(epoch: int) -> bool:
    """Whether the scripted metric improves at ``epoch``: 0, then 1, 2, 4, 7, 11, 16, ...

    >>> [e for e in range(12) if improves(e)]
    [0, 1, 2, 4, 7, 11]
    """
    if epoch == 0:
        return True
    n = (1 + math.isqrt(8 * epoch - 7)) // 2  # solve 1 + n(n-1)/2 == epoch
    return 1 + n * (n - 1) // 2 == epoch


def scripted_loss(epoch: int) -> float:
    """The monitored value at ``epoch``: a new minimum exactly where :func:`improves` says.

    >>> [scripted_loss(e) for e in range(5)]
    [99.0, 98.0, 97.0, 97.5, 96.0]
    """
    best = 100.0 - sum(improves(e) for e in range(epoch + 1))
    return best if improves(epoch) else best + 0.5


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux ``VmHWM``), in MB; NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return math.nan


def cpu_seconds() -> float:
    """User and system CPU time of this process, all its threads (a background writer's too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class EpochClock:
    """Clock readings at the start of each epoch, when its training ended, and at its end; and
    the wall and CPU time of the whole fit."""

    def __init__(self) -> None:
        self.epochs: list[list[float]] = []
        self.hwm_mb = math.nan
        self.fit_s = self.cpu_s = math.nan
        self._fit_started = (0.0, 0.0)

    def begin_fit(self) -> None:
        self._fit_started = (time.perf_counter(), cpu_seconds())

    def end_fit(self) -> None:
        self.fit_s = time.perf_counter() - self._fit_started[0]
        self.cpu_s = cpu_seconds() - self._fit_started[1]

    def start(self) -> None:
        now = time.perf_counter()
        self._close(now)
        self.epochs.append([now, now, math.nan])

    def trained(self) -> None:
        self.epochs[-1][1] = time.perf_counter()

    def stop(self) -> None:
        self._close(time.perf_counter())
        self.hwm_mb = peak_rss_mb()

    def _close(self, now: float) -> None:
        if self.epochs and math.isnan(self.epochs[-1][2]):
            self.epochs[-1][2] = now


# -- the model and data, the same for every framework ------------------------------------------


def torch_model(layers: int, width: int) -> Any:
    import torch

    torch.manual_seed(0)
    modules: list[Any] = []
    for i in range(layers):
        modules.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules)


def data(spec: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(spec["samples"], spec["width"], generator=g)
    return x, torch.randn(spec["samples"], spec["width"], generator=g) * 0.1


LR = 1e-4


# -- plain PyTorch ------------------------------------------------------------------------------


def train_epoch(model: Any, optimizer: Any, x: Any, y: Any, batch: int) -> Any:
    """One epoch over ``x`` in batches; the last batch's loss."""
    import torch

    for i in range(0, len(x), batch):
        loss = torch.nn.functional.mse_loss(model(x[i : i + batch]), y[i : i + batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss


def fit_torch(spec: dict[str, Any], clock: EpochClock) -> None:
    import torch

    from bestsave.adapters.torch import TorchCheckpointer

    model = torch_model(spec["layers"], spec["width"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data(spec)
    config, batch = spec["config"], spec["batch"]
    path = os.path.join(spec["dir"], "best.pth")
    os.makedirs(spec["dir"], exist_ok=True)
    ckpt = None
    if config == "ours":
        ckpt = TorchCheckpointer(
            spec["dir"],
            monitor=MONITOR,
            mode="min",
            save_weights_only=True,
            trackers=(),
            staging_memory=spec.get("staging_memory"),  # set by budget.py
        )
    best = math.inf

    clock.begin_fit()
    for epoch in range(spec["epochs"]):
        clock.start()
        loss = train_epoch(model, optimizer, x, y, batch)
        clock.trained()
        score = scripted_loss(epoch)
        if ckpt is not None:
            ckpt.step(epoch, {MONITOR: score, "loss": loss.item()}, model=model)
        elif config == "theirs" and score < best:
            # What a hand-written loop does: save the state dict when the metric improves.
            best = score
            torch.save(model.state_dict(), path)
    clock.stop()
    if ckpt is not None:
        ckpt.close()  # the wait for pending writes counts
    clock.end_fit()
    if ckpt is not None and ckpt.best is not None:
        spec["staged"] = ckpt.best.staging  # how the best was staged, for budget.py


# -- Lightning ----------------------------------------------------------------------------------


def fit_lightning(spec: dict[str, Any], clock: EpochClock, ddp: bool = False) -> None:
    """With ``ddp``, two processes on the CPU (gloo); Lightning starts the second by running
    this script again, and only the first reports."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from bestsave.adapters.lightning import BestCheckpoint

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch_model(spec["layers"], spec["width"])

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            xb, yb = batch
            return torch.nn.functional.mse_loss(self.net(xb), yb)

        def on_train_epoch_end(self) -> None:
            self.log(MONITOR, scripted_loss(self.current_epoch))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR)

    class Timer(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            clock.start()

        def on_train_batch_end(self, *args: Any) -> None:
            clock.trained()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            clock.stop()  # Lightning runs checkpoint callbacks last: before BestCheckpoint's flush

    x, y = data(spec)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=spec["batch"]
    )
    callbacks: list[Any] = [Timer()]
    if spec["config"] == "theirs":
        callbacks.append(
            ModelCheckpoint(dirpath=spec["dir"], monitor=MONITOR, mode="min", save_top_k=1)
        )
    elif spec["config"] == "ours":
        callbacks.append(
            BestCheckpoint(
                dirpath=spec["dir"], monitor=MONITOR, mode="min", save_top_k=1, trackers=()
            )
        )
    trainer = pl.Trainer(
        max_epochs=spec["epochs"],
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=spec["config"] != "none",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=spec["dir"],
    )
    module = Module()
    clock.begin_fit()
    trainer.fit(module, train_dataloaders=loader)
    clock.end_fit()


# -- Hugging Face Transformers ------------------------------------------------------------------


def fit_transformers(spec: dict[str, Any], clock: EpochClock) -> None:
    """The same network as a ``PreTrainedModel`` built from a config, trained by the Trainer
    with an evaluation at every epoch's end whose ``eval_scripted_loss`` follows the script.
    ``theirs`` is the Trainer's own way to keep the best: ``save_strategy="epoch"`` (a save at
    every evaluation), ``save_total_limit=1`` and ``load_best_model_at_end``; ``ours`` is
    ``BestSaveCallback``."""
    import contextlib
    import io

    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        import transformers

    from bestsave.adapters.transformers import BestSaveCallback

    class Config(transformers.PretrainedConfig):  # type: ignore[misc]
        model_type = "bench-mlp"

        def __init__(self, layers: int = 1, width: int = 1, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.layers, self.width = layers, width

    class Net(transformers.PreTrainedModel):  # type: ignore[misc]
        config_class = Config

        def __init__(self, config: Config) -> None:
            super().__init__(config)
            self.net = torch_model(config.layers, config.width)
            self.post_init()

        def forward(self, x: Any = None, y: Any = None) -> dict[str, Any]:
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, y), "logits": out[:, :1]}

    class Timer(transformers.TrainerCallback):  # type: ignore[misc]
        def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.trained()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            clock.stop()  # before BestSaveCallback's flush, which the fit time counts

    epoch = {"done": 0}

    def scripted(_: object) -> dict[str, float]:
        epoch["done"] += 1
        return {"scripted_loss": scripted_loss(epoch["done"] - 1)}

    x, y = data(spec)
    rows = [{"x": x[i], "y": y[i]} for i in range(len(x))]
    config = spec["config"]
    saving: dict[str, Any] = {"save_strategy": "no"}
    if config == "theirs":
        saving = dict(save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
                      metric_for_best_model="eval_scripted_loss")  # fmt: skip
    args = transformers.TrainingArguments(
        spec["dir"], eval_strategy="epoch", num_train_epochs=spec["epochs"],
        per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=spec["batch"],
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", label_names=["y"],
        report_to=[], disable_tqdm=True, log_level="error", use_cpu=True,
        dataloader_pin_memory=False, **saving,
    )  # fmt: skip
    callbacks: list[Any] = [Timer()]
    if config == "ours":
        callbacks.append(BestSaveCallback(monitor="eval_scripted_loss", trackers=()))
    trainer = transformers.Trainer(
        Net(Config(layers=spec["layers"], width=spec["width"])), args, train_dataset=rows,
        eval_dataset=rows, compute_metrics=scripted, callbacks=callbacks,
    )  # fmt: skip
    clock.begin_fit()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    clock.end_fit()


# -- Keras 3 (torch backend) --------------------------------------------------------------------


def fit_keras(spec: dict[str, Any], clock: EpochClock) -> None:
    import keras

    from bestsave.adapters.keras import BestModelCheckpoint

    class Timer(keras.callbacks.Callback):
        # First in the list: it runs before the checkpoint callback at every event, and the
        # scripted metric it adds to the epoch's logs is what the checkpoint callback reads.
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            clock.start()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            clock.trained()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs[MONITOR] = scripted_loss(epoch)

        def on_train_end(self, logs: Any = None) -> None:
            clock.stop()

    keras.utils.set_random_seed(0)
    width = spec["width"]
    model = keras.Sequential(
        [keras.Input((width,))]
        + [
            keras.layers.Dense(width, activation="relu" if i < spec["layers"] - 1 else None)
            for i in range(spec["layers"])
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    x, y = (t.numpy() for t in data(spec))
    os.makedirs(spec["dir"], exist_ok=True)
    callbacks: list[Any] = [Timer()]
    if spec["config"] == "theirs":
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(spec["dir"], "best.weights.h5"),
                monitor=MONITOR,
                mode="min",
                save_best_only=True,
                save_weights_only=True,
            )
        )
    elif spec["config"] == "ours":
        callbacks.append(
            BestModelCheckpoint(
                os.path.join(spec["dir"], "best.weights.h5"),
                monitor=MONITOR,
                mode="min",
                save_best_only=True,
                save_weights_only=True,
                trackers=(),
            )
        )
    clock.begin_fit()
    model.fit(
        x,
        y,
        batch_size=spec["batch"],
        epochs=spec["epochs"],
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    clock.end_fit()


# -- fastai -------------------------------------------------------------------------------------


def fit_fastai(spec: dict[str, Any], clock: EpochClock) -> None:
    import numpy as np
    import torch
    from fastai.callback.core import Callback
    from fastai.callback.tracker import SaveModelCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner, ValueMetric
    from fastai.optimizer import SGD

    from bestsave.adapters.fastai import SaveBestModelCallback

    class Timer(Callback):
        order = -10  # its after_fit runs before the checkpoint callbacks load the best

        def before_epoch(self) -> None:
            clock.start()

        def after_validate(self) -> None:
            clock.trained()

        def after_fit(self) -> None:
            clock.stop()

    x, y = data(spec)
    train = torch.utils.data.TensorDataset(x, y)
    valid = torch.utils.data.TensorDataset(x[:2], y[:2])
    dls = DataLoaders(
        DataLoader(train, bs=spec["batch"]), DataLoader(valid, bs=spec["batch"]), device="cpu"
    )
    callbacks: list[Any] = [Timer()]
    if spec["config"] == "theirs":
        callbacks.append(SaveModelCallback(monitor=MONITOR, comp=np.less))
    elif spec["config"] == "ours":
        callbacks.append(SaveBestModelCallback(monitor=MONITOR, comp=np.less))
    learn: Any  # the metric reads the epoch of the learner it is given to
    learn = Learner(
        dls,
        torch_model(spec["layers"], spec["width"]),
        loss_func=torch.nn.functional.mse_loss,
        opt_func=SGD,
        lr=LR,
        metrics=ValueMetric(lambda: scripted_loss(learn.epoch), MONITOR),
        path=spec["dir"],
        cbs=callbacks,
    )
    with learn.no_bar(), learn.no_logging():
        clock.begin_fit()
        learn.fit(spec["epochs"], lr=LR)
        clock.end_fit()


# -- FSDP2 on two processes: bestsave against dcp.save and dcp.async_save ---------------------


def fsdp_ranks(spec: dict[str, Any]) -> None:
    """Run the FSDP2 configuration ``spec`` on two processes (gloo on the CPU), each with its
    share of the cores; rank 0 writes the result. A failed rank fails the run."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = str(max(1, (cores or 1) // FSDP_WORLD))
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, json.dumps(spec)],
            env={**os.environ, **rank_env(rank), "MASTER_PORT": port, "OMP_NUM_THREADS": threads},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(FSDP_WORLD)
    ]
    errors = [p.communicate()[1] for p in processes]
    for rank, (p, error) in enumerate(zip(processes, errors)):
        if p.returncode != 0:
            sys.stderr.write(error)
            raise SystemExit(f"rank {rank} failed (exit code {p.returncode})")


FSDP_WORLD = 2


def rank_env(rank: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(FSDP_WORLD),
        "MASTER_ADDR": "127.0.0.1",
    }


def fsdp_model(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """This rank's FSDP2 model (every ``Linear`` sharded over the two processes), its Adam
    optimiser and the batches it trains on."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (FSDP_WORLD,))
    model = torch_model(spec["layers"], spec["width"])
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=LR), data(spec)


def fsdp_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """Model and optimiser state as DCP saves it: ``DTensor`` shards, keyed by name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, [optimizer])
    return {"model": model_state, "optimizer": optimizer_state}


def fit_fsdp(spec: dict[str, Any], clock: EpochClock) -> None:
    """A hand-written FSDP2 loop that saves model and optimiser when the metric improves:
    with ``dcp.save`` (``theirs``), ``dcp.async_save`` over a gloo group of its own, waiting
    for the previous save before the next as its documentation advises (``theirs_async``), or
    ``TorchCheckpointer`` (``ours``)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from bestsave.adapters.torch import TorchCheckpointer

    config, batch = spec["config"], spec["batch"]
    model, optimizer, (x, y) = fsdp_model(spec)
    path = os.path.join(spec["dir"], "best")
    os.makedirs(spec["dir"], exist_ok=True)
    ckpt = None
    if config == "ours":
        ckpt = TorchCheckpointer(spec["dir"], monitor=MONITOR, mode="min", trackers=())
    group = dist.new_group(backend="gloo") if config == "theirs_async" else None
    pending: Any = None
    best = math.inf
    dist.barrier()

    clock.begin_fit()
    for epoch in range(spec["epochs"]):
        clock.start()
        train_epoch(model, optimizer, x, y, batch)
        clock.trained()
        score = scripted_loss(epoch)
        if ckpt is not None:
            ckpt.step(epoch, {MONITOR: score}, model=model, optimizer=optimizer)
        elif config.startswith("theirs") and score < best:
            best = score
            if config == "theirs":
                dcp.save(fsdp_state(model, optimizer), checkpoint_id=path)
            else:
                if pending is not None:
                    pending.result()
                pending = dcp.async_save(
                    fsdp_state(model, optimizer), checkpoint_id=path, process_group=group
                )
    clock.stop()
    if ckpt is not None:
        ckpt.close()  # the wait for pending writes counts
    if pending is not None:
        pending.result()
    dist.barrier()  # the fit ends when every rank's saves are done
    clock.end_fit()


def fsdp_limit(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds for each rank to copy its shards of model and Adam state into host tensors
    allocated (and touched) beforehand, both ranks at once: the median over ``spec["times"]``
    tries of the slower rank. Also the state's size, over both ranks."""
    import statistics

    import torch
    import torch.distributed as dist

    model, optimizer, (x, y) = fsdp_model(spec)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()  # Adam's state exists from the first step on
    local = [
        v.to_local() if hasattr(v, "to_local") else v for v in _leaves(fsdp_state(model, optimizer))
    ]
    dst = [torch.empty_like(v).copy_(v) for v in local]
    times = []
    for _ in range(spec.get("times", 5)):
        dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            for d, v in zip(dst, local):
                d.copy_(v)
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    size = torch.tensor([float(sum(v.numel() * v.element_size() for v in local))])
    dist.all_reduce(size)
    return {"copy_s": statistics.median(times), "state_mb": float(size) / 1e6}


def _leaves(obj: Any) -> list[Any]:
    """The tensors in nested dicts and lists."""
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _leaves(v)]
    return [obj] if hasattr(obj, "numel") else []


def run_fsdp(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    try:
        if spec["config"] == "limit":
            return fsdp_limit(spec)
        clock = EpochClock()
        fit_fsdp(spec, clock)
        return result_of(spec, clock)
    finally:
        dist.destroy_process_group()


# -- the limit: a copy into host memory allocated beforehand ------------------------------------


def measure_limit(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds to copy the state dict into preallocated host tensors (also with the threads
    one of two DDP processes has), for a fresh ``clone()`` and for ``torch.save`` to the
    checkpoint directory (medians of ``spec["times"]`` tries)."""
    import statistics

    import torch

    state = torch_model(spec["layers"], spec["width"]).state_dict()
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    for k, v in state.items():  # touch every page once: the buffers are "allocated beforehand"
        dst[k].copy_(v)
    os.makedirs(spec["dir"], exist_ok=True)
    path = os.path.join(spec["dir"], "limit.pth")

    def timed(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(spec.get("times", 5)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def copy() -> None:
        with torch.no_grad():
            for k, v in state.items():
                dst[k].copy_(v)

    def clone() -> None:
        {k: v.clone() for k, v in state.items()}

    def ddp_copy() -> float:
        # Lightning gives each of the two DDP processes its share of the cores.
        threads = torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // 2))
        try:
            return timed(copy)
        finally:
            torch.set_num_threads(threads)

    return {
        "copy_s": timed(copy),
        "copy_ddp_s": ddp_copy(),
        "clone_s": timed(clone),
        "torch_save_s": timed(lambda: torch.save(state, path)),
        "state_mb": sum(v.numel() * v.element_size() for v in state.values()) / 1e6,
    }


FITS: dict[str, Callable[[dict[str, Any], EpochClock], None]] = {
    "torch": fit_torch,
    "lightning": fit_lightning,
    "lightning_ddp": lambda spec, clock: fit_lightning(spec, clock, ddp=True),
    "keras": fit_keras,
    "fastai": fit_fastai,
    "transformers": fit_transformers,
}


def result_of(spec: dict[str, Any], clock: EpochClock) -> dict[str, Any]:
    return {
        "fit_s": clock.fit_s,
        "cpu_s": clock.cpu_s,
        "epochs": clock.epochs,
        "saves": [e for e in range(spec["epochs"]) if improves(e)],
        "hwm_mb": clock.hwm_mb,
        "staged": spec.get("staged"),
    }


def run(spec: dict[str, Any]) -> None:
    """Run the configuration ``spec`` describes and write its result to ``spec["result"]``."""
    if spec["framework"] == "fsdp" and "RANK" not in os.environ:
        fsdp_ranks(spec)  # rank 0 writes the result
        return
    if spec["framework"] == "limit":
        result = measure_limit(spec)
    elif spec["framework"] == "fsdp":
        result = run_fsdp(spec)
    else:
        clock = EpochClock()
        FITS[spec["framework"]](spec, clock)
        result = result_of(spec, clock)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return  # a DDP worker: the first process reports
    with open(spec["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")
    spec = json.loads(sys.argv[1])
    run(spec)
    if spec["framework"] == "fsdp" and "RANK" in os.environ:
        # A rank leaves without the interpreter's shutdown: gloo's threads can still hold
        # tensors then, and freeing them there aborts the process (pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
