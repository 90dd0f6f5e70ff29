"""The command line on runs made by each framework's adapter: ls, verify, plot and soup."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bestsave import load_manifest
from bestsave.cli import main

DATA = Path(__file__).parent / "data" / "lightning"
SCORES = [0.2, 0.6, 0.4, 0.5]  # top 2: epochs 1 and 3, best 1


def check_cli(run: Path, out: Path, capsys: pytest.CaptureFixture[str], soup_name: str) -> Path:
    """ls names the best, verify passes, plot writes a PNG, soup averages the two kept."""
    capsys.readouterr()  # what training printed
    assert main(["ls", str(run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    manifest = load_manifest(run)
    assert listed["best"] == manifest.best.name and manifest.best.epoch == 1
    assert main(["verify", str(run)]) == 0
    png = out / "curve.png"
    assert main(["plot", str(run), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    soup = out / soup_name
    assert main(["soup", str(run), "-o", str(soup), "--top", "2"]) == 0
    capsys.readouterr()
    return soup


def mean_of(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(s[k].double() for s in states) / len(states) for k in states[0]}


def assert_average(soup: dict[str, torch.Tensor], members: list[dict[str, torch.Tensor]]) -> None:
    expected = mean_of(members)
    for key, value in expected.items():
        torch.testing.assert_close(soup[key].double(), value)


def test_lightning_run(tmp_path, capsys):
    from bestsave.adapters.lightning import BestCheckpoint

    sys.path.insert(0, str(DATA))
    scripted = importlib.import_module("lightning_scripted")
    checkpoint = BestCheckpoint(
        dirpath=tmp_path / "run", monitor="val_score", mode="max", save_top_k=2
    )
    scripted.fit(tmp_path, SCORES, checkpoint)
    soup = check_cli(tmp_path / "run", tmp_path, capsys, "soup.ckpt")
    members = [
        torch.load(r.path, weights_only=True)["state_dict"]
        for r in load_manifest(tmp_path / "run").kept
    ]
    assert_average(torch.load(soup, weights_only=True)["state_dict"], members)


def test_fastai_run(tmp_path, capsys):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.metrics import Metric

    from bestsave.adapters.fastai import SaveBestModelCallback

    class Scripted(Metric):
        def reset(self):
            pass

        def accumulate(self, learn):
            self.epoch = learn.epoch

        @property
        def value(self):
            return SCORES[self.epoch]

        @property
        def name(self):
            return "score"

    torch.manual_seed(0)
    x = torch.randn(48, 3)
    data = list(zip(x, x.sum(1, keepdim=True)))
    dls = DataLoaders.from_dsets(data[:32], data[32:], bs=8, device="cpu")
    learn = Learner(
        dls,
        torch.nn.Linear(3, 1),
        loss_func=torch.nn.MSELoss(),
        path=tmp_path,
        metrics=[Scripted()],
    )
    save = SaveBestModelCallback(monitor="score", top_k=2)
    with learn.no_bar(), learn.no_logging():
        learn.fit(len(SCORES), lr=0.05, cbs=[save])
    run = tmp_path / "models"  # the run's own files are in models/.bestsave/<run>/
    soup = check_cli(run, tmp_path, capsys, "soup.pth")
    members = [torch.load(r.path, weights_only=True) for r in load_manifest(run).kept]
    assert_average(torch.load(soup, weights_only=True), members)


KERAS_RUN = """
import sys
import numpy as np, keras
from bestsave.adapters.keras import BestModelCheckpoint
scores = [0.2, 0.6, 0.4, 0.5]
class Script(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        logs["val_score"] = scores[epoch]
rng = np.random.default_rng(0)
x = rng.normal(size=(48, 4)).astype("float32"); y = (x[:, :1] > 0).astype("float32")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "relu"),
                          keras.layers.Dense(1, "sigmoid")])
model.compile("adam", "binary_crossentropy")
ckpt = BestModelCheckpoint(sys.argv[1] + "/{epoch:02d}.weights.h5", monitor="val_score",
                           mode="max", save_best_only=True, top_k=2)
model.fit(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=4, verbose=0,
          callbacks=[Script(), ckpt])
if len(sys.argv) > 2:  # load the soup into the same model
    model.load_weights(sys.argv[2])
    print("loaded", len(model.get_weights()))
"""


def test_keras_run(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    script = tmp_path / "keras_run.py"
    script.write_text(KERAS_RUN)
    run = tmp_path / "run"
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}
    subprocess.run(
        [sys.executable, str(script), str(run)], check=True, env=env, capture_output=True
    )
    soup = check_cli(run, tmp_path, capsys, "soup.weights.h5")

    def arrays(path):
        with h5py.File(path, "r") as f:
            found = {}
            f.visititems(
                lambda name, obj: (
                    found.__setitem__(name, obj[()])
                    if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer")
                    else None
                )
            )
            return found

    members = [arrays(r.path) for r in load_manifest(run).kept]
    souped = arrays(soup)
    assert souped.keys() == members[0].keys()
    for key, value in souped.items():
        assert value == pytest.approx((members[0][key] + members[1][key]) / 2)
    loaded = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "again"), str(soup)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "loaded 4" in loaded.stdout
