"""Model soups: the uniform average of the weights of a run's kept checkpoints.

The near-best checkpoints that ``top_k`` or the delta-ensemble keep often generalise better
averaged than apart (Wortsman et al., "Model soups", 2022). :func:`soup` averages them into one
file in the format the run saved, so it loads the way the run's checkpoints load:

========================  =========================================  ==============================
run                       weights averaged                           everything else
========================  =========================================  ==============================
plain PyTorch (``.pth``)  ``["model"]``                              the best checkpoint's
Lightning (``.ckpt``)     ``["state_dict"]``                         the best checkpoint's
fastai (``.pth``)         the state dict, or ``["model"]`` beside    the best checkpoint's
                          ``["opt"]``
Keras (``.weights.h5``,   every float variable outside the           the best checkpoint's
``.keras``)               optimizer
========================  =========================================  ==============================

Floating-point tensors are averaged (in float64, then cast back); integer and boolean ones (a
BatchNorm's ``num_batches_tracked``, a step counter) are the best checkpoint's. Checkpoints whose
keys or shapes differ are refused: they are not the same model.

Torch files are loaded with ``torch.load(weights_only=True)`` after their sha256 is checked
against their record, so a soup never unpickles code. torch and h5py are imported only when
needed.

Example:
    >>> import tempfile, torch
    >>> from bestsave.adapters.torch import TorchCheckpointer
    >>> from bestsave.soup import soup
    >>> run = tempfile.mkdtemp()
    >>> ckpt = TorchCheckpointer(run, monitor="val_loss", top_k=2)
    >>> model = torch.nn.Linear(2, 1)
    >>> for epoch, loss in enumerate([0.3, 0.2, 0.4]):
    ...     with torch.no_grad():
    ...         _ = model.weight.fill_(epoch)
    ...     _ = ckpt.step(epoch, {"val_loss": loss}, model=model)
    >>> ckpt.close()  # wait for background writes
    >>> out = f"{tempfile.mkdtemp()}/soup.pth"
    >>> [r.epoch for r in soup(run, out)]
    [1, 0]
    >>> torch.load(out, weights_only=True)["model"]["weight"]
    tensor([[0.5000, 0.5000]])
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from bestsave.manifest import fetch, load_manifest
from bestsave.record import Record

__all__ = ["average", "members", "soup"]

"""Kinds of checkpoints kept for their score: the ones a soup is made of."""

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_KERAS_WEIGHTS = "model.weights.h5"


def members(
    dirpath: str | os.PathLike[str],
    top: int | None = None,
    run: str | None = None,
    **storage_options: Any,
) -> list[Record]:
    """The checkpoints a soup of the run in ``dirpath`` averages: those kept for their score
    (best, top-k, ensemble), best first; the ``top`` best when given."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be an int >= 1 (how many of the best to average), not {top!r}")
    manifest = load_manifest(dirpath, run, **storage_options)
    ranked = [r for r in manifest.kept if r.ranked]
    if not ranked:
        raise ValueError(
            f"the run in {manifest.dirpath} keeps no checkpoint for its score, nothing to "
            "average; train with top_k > 1 or delta to keep near-best checkpoints"
        )
    chosen = ranked[:top] if top else ranked
    # The best comes first: the soup takes everything it does not average from it.
    best = manifest.best
    if best is not None and best in chosen:
        chosen = [best] + [r for r in chosen if r != best]
    return chosen


def soup(
    dirpath: str | os.PathLike[str],
    output: str | os.PathLike[str],
    top: int | None = None,
    run: str | None = None,
    **storage_options: Any,
) -> list[Record]:
    """Average the weights of the run's kept checkpoints into ``output``; returns the members.

    Args:
        dirpath: The run's directory (a local path or an fsspec URL).
        output: The file to write, in the run's format (``.weights.h5`` for Keras weights).
        top: Average only the ``top`` best; all checkpoints kept for their score by default.
        run: The run's name, when the directory holds several.
        storage_options: Passed to fsspec for remote URLs.

    Raises:
        ValueError: nothing to average, the checkpoints are not the same model (keys or shapes
            differ), or a file is not a format soup reads.
        bestsave.ChecksumError: a checkpoint differs from its record.
    """
    chosen = members(dirpath, top, run, **storage_options)
    target = os.path.abspath(os.fspath(output))
    if any(os.path.abspath(r.path) == target for r in chosen):
        raise ValueError(
            f"{output} is one of the checkpoints being averaged; write the soup to another file"
        )
    average([fetch(r, **storage_options) for r in chosen], target)
    return chosen


def average(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]) -> None:
    """Write the uniform average of the checkpoint files ``paths`` to ``output``.

    The first file is the template: its container, its non-float values and everything besides
    the weights are written as they are. All files must share one format.
    """
    files = [os.fspath(p) for p in paths]
    if not files:
        raise ValueError("average() needs at least one checkpoint file")
    formats = {p: _format(p) for p in files}
    if len(set(formats.values())) > 1:
        listing = ", ".join(f"{os.path.basename(p)} ({f})" for p, f in formats.items())
        raise ValueError(f"cannot average checkpoints of different formats: {listing}")
    kind = formats[files[0]]
    out = os.fspath(output)
    if kind == "keras-weights" and not out.endswith(".weights.h5"):
        raise ValueError(
            f"Keras loads weights only from files named *.weights.h5; name the "
            f"soup e.g. {_renamed(out, '.weights.h5')}"
        )
    if kind == "keras" and not out.endswith(".keras"):
        raise ValueError(
            f"Keras loads models only from files named *.keras; name the soup e.g. "
            f"{_renamed(out, '.keras')}"
        )
    writer = {"torch": _average_torch, "keras-weights": _average_h5, "keras": _average_keras}[kind]
    _atomic(out, lambda tmp: writer(files, tmp))


def _renamed(path: str, extension: str) -> str:
    base = os.path.basename(path).split(".", 1)[0] or "soup"
    return os.path.join(os.path.dirname(path), base + extension)


def _format(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head == _HDF5_SIGNATURE:
        return "keras-weights"
    if zipfile.is_zipfile(path):  # torch.save writes zip archives too
        with zipfile.ZipFile(path) as z:
            if _KERAS_WEIGHTS in z.namelist():
                return "keras"
    return "torch"


def _atomic(output: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file beside ``output``: a failure leaves no partial soup."""
    directory = os.path.dirname(output) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the folder of {output} does not exist; create it first")
    tmp = os.path.join(directory, f".{os.path.basename(output)}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mismatch(ref: str, other: str, keys_a: Any, keys_b: Any) -> ValueError:
    only_a, only_b = sorted(set(keys_a) - set(keys_b)), sorted(set(keys_b) - set(keys_a))
    parts = []
    if only_a:
        parts.append(f"only {os.path.basename(ref)} has {_few(only_a)}")
    if only_b:
        parts.append(f"only {os.path.basename(other)} has {_few(only_b)}")
    return ValueError(
        f"cannot average {os.path.basename(ref)} and {os.path.basename(other)}: they are not "
        f"the same model ({'; '.join(parts)}); average checkpoints of one architecture "
        "(--top N to leave the others out)"
    )


def _shape_mismatch(ref: str, other: str, key: str, a: Any, b: Any) -> ValueError:
    return ValueError(
        f"cannot average {os.path.basename(ref)} and {os.path.basename(other)}: {key!r} has "
        f"shape {tuple(a)} in one and {tuple(b)} in the other; average checkpoints of one "
        "architecture (--top N to leave the others out)"
    )


def _few(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


# -- torch: plain PyTorch, Lightning, fastai ----------------------------------------------------


def _torch_load(path: str) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        allowed = _fastai_safe_globals()
        if allowed:  # fastai saves its optimizer state with fastcore lists and numpy scalars
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                pass
        raise ValueError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({_reason(e)}); "
            "soup reads checkpoints of tensors, numbers and containers only"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} is not a torch checkpoint soup can read ({e})") from None


def _reason(error: Exception) -> str:
    """The line of torch's long weights-only message that names what could not be loaded."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")


def _fastai_safe_globals() -> list[Any]:
    """What fastai's own ``load_model`` allows when it loads with ``weights_only=True``."""
    try:
        import numpy as np
        from fastcore.foundation import L
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in getattr(np.dtypes, "__all__", [])]
    return [L, core.multiarray.scalar, np.dtype, *dtypes]


def _state_dict(container: Any, path: str) -> tuple[str | None, MutableMapping[str, Any]]:
    """Where the weights are in a loaded checkpoint ("state_dict", "model", or None: the whole
    file), and the weights."""
    import torch

    if isinstance(container, MutableMapping):
        for key in ("state_dict", "model"):  # Lightning; plain PyTorch and fastai with_opt
            if isinstance(container.get(key), MutableMapping):
                return key, container[key]
        if container and all(isinstance(v, torch.Tensor) for v in container.values()):
            return None, container  # fastai without the optimizer: a bare state dict
    raise ValueError(
        f"{path} holds no state dict soup can average: expected a model's state dict, or a dict "
        "with one under 'model' (plain PyTorch, fastai) or 'state_dict' (Lightning)"
    )


def _average_torch(paths: Sequence[str], output: str) -> None:
    import torch

    def averaged(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())

    template = _torch_load(paths[0])
    where, weights = _state_dict(template, paths[0])
    sums = {
        k: v.to(torch.complex128 if v.is_complex() else torch.float64, copy=True)
        for k, v in weights.items()
        if averaged(v)
    }
    for path in paths[1:]:
        other_where, other = _state_dict(_torch_load(path), path)
        if other_where != where:
            raise ValueError(
                f"cannot average {os.path.basename(paths[0])} and {os.path.basename(path)}: one "
                f"keeps its weights under {where!r}, the other under {other_where!r}; they come "
                "from different frameworks"
            )
        _check_same(paths[0], path, weights, other)
        for key, total in sums.items():
            total += other[key].to(total.dtype)
    for key, total in sums.items():
        weights[key] = (total / len(paths)).to(weights[key].dtype)
    torch.save(template, output)


def _check_same(ref: str, path: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if a.keys() != b.keys():
        raise _mismatch(ref, path, a.keys(), b.keys())
    for key, value in a.items():
        shape_a, shape_b = getattr(value, "shape", None), getattr(b[key], "shape", None)
        if shape_a != shape_b:
            raise _shape_mismatch(ref, path, key, shape_a or (), shape_b or ())


# -- Keras: .weights.h5 and .keras ------------------------------------------------------------


def _h5_variables(f: Any) -> dict[str, Any]:
    """The model's variables in a Keras weights file: datasets outside the optimizer's group."""
    import h5py

    found: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer/"):
            found[name] = obj

    f.visititems(visit)
    return found


def _average_h5(paths: Sequence[str], output: str) -> None:
    import h5py
    import numpy as np

    def averaged(dataset: Any) -> bool:
        return bool(
            np.issubdtype(dataset.dtype, np.floating)
            or np.issubdtype(dataset.dtype, np.complexfloating)
        )

    shutil.copyfile(paths[0], output)  # the best's layout, optimizer and integer variables
    with h5py.File(output, "r+") as out:
        variables = _h5_variables(out)
        sums = {
            k: np.asarray(v[()], dtype=np.complex128 if np.iscomplexobj(v[()]) else np.float64)
            for k, v in variables.items()
            if averaged(v)
        }
        for path in paths[1:]:
            with h5py.File(path, "r") as f:
                other = _h5_variables(f)
                if other.keys() != variables.keys():
                    raise _mismatch(paths[0], path, variables.keys(), other.keys())
                for key, dataset in variables.items():
                    if other[key].shape != dataset.shape:
                        raise _shape_mismatch(paths[0], path, key, dataset.shape, other[key].shape)
                for key, total in sums.items():
                    total += other[key][()]
        for key, total in sums.items():
            variables[key][...] = (total / len(paths)).astype(variables[key].dtype)


def _average_keras(paths: Sequence[str], output: str) -> None:
    """A ``.keras`` archive: average the weights file inside, keep the best's config."""
    with tempfile.TemporaryDirectory(prefix="bestsave-soup-") as scratch:
        inner = []
        for i, path in enumerate(paths):
            os.mkdir(os.path.join(scratch, str(i)))  # named as the archive, for messages
            local = os.path.join(scratch, str(i), os.path.basename(path))
            with (
                zipfile.ZipFile(path) as archive,
                archive.open(_KERAS_WEIGHTS) as src,
                open(local, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            inner.append(local)
        merged = os.path.join(scratch, "soup.weights.h5")
        _average_h5(inner, merged)
        with zipfile.ZipFile(paths[0]) as src, zipfile.ZipFile(output, "w") as dst:
            for info in src.infolist():
                if info.filename == _KERAS_WEIGHTS:
                    with open(merged, "rb") as f:
                        dst.writestr(info, f.read())
                else:
                    dst.writestr(info, src.read(info))
