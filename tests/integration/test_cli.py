"""The bestsave command line on runs made by real short trainings with the plain-PyTorch adapter.

Each command runs through ``main([...])`` (what the console script calls) and once through the
installed ``bestsave`` script and ``python -m bestsave`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from runfiles import run_folder

from bestsave import load_manifest
from bestsave.adapters.torch import TorchCheckpointer
from bestsave.cli import main
from bestsave.store import TMP_PREFIX

# Scripted validation accuracy per epoch; training itself is real. With top_k=3: best epoch 5,
# kept 5, 3, 6; evicted 0, 1, 2, 4 along the way.
ACCS = [0.50, 0.70, 0.60, 0.80, 0.75, 0.90, 0.85]
BEST_EPOCH = 5


def train(dirpath: Path, accs: list[float], seed: int = 0, **options: Any) -> Path:
    """A few epochs of a tiny classifier, checkpointed by TorchCheckpointer."""
    torch.manual_seed(seed)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = TorchCheckpointer(dirpath, monitor="val_acc", **options)
    for epoch, acc in enumerate(accs):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.cross_entropy(model(x), y)
        metrics = {
            "val_acc": acc,
            "val_loss": val_loss,
            "train_loss": loss.detach(),
            "train_acc": acc + 0.05,
        }
        ckpt.step(epoch, metrics, model=model, optimizer=optimizer, step=(epoch + 1) * 4)
    ckpt.close()
    return dirpath


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    train(root / "a", ACCS, top_k=3, save_last=True)
    train(root / "b", [0.6, 0.95, 0.7], seed=1)
    return root


@pytest.fixture
def run(runs: Path, tmp_path: Path) -> Path:
    """A copy of run ``a`` that a test may damage."""
    return Path(shutil.copytree(runs / "a", tmp_path / "a"))


def cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def best_name(run: Path) -> str:
    return load_manifest(run).best.name  # type: ignore[union-attr]


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("bestsave: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


# -- ls --------------------------------------------------------------------------------------


def test_ls_json_names_the_best_and_lists_kept_checkpoints_best_first(runs, capsys) -> None:
    code, out, _ = cli(capsys, "ls", runs / "a", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["monitor"] == "val_acc" and data["mode"] == "max"
    assert data["best"] == best_name(runs / "a")
    rows = data["checkpoints"]
    ranked = [r for r in rows if r["kind"] != "last"]
    assert [r["epoch"] for r in ranked] == [5, 6, 3]
    assert [r["best"] for r in rows] == [True, False, False, False]
    assert rows[-1]["kind"] == "last" and rows[-1]["epoch"] == len(ACCS) - 1
    best = rows[0]
    assert best["epoch"] == BEST_EPOCH and best["score"] == ACCS[BEST_EPOCH]
    assert best["metrics"]["train_acc"] == pytest.approx(ACCS[BEST_EPOCH] + 0.05)
    assert Path(best["path"]).is_file() and best["bytes"] == Path(best["path"]).stat().st_size


def test_ls_table_marks_the_best_and_shows_key_metrics(runs, capsys) -> None:
    code, out, _ = cli(capsys, "ls", runs / "a")
    assert code == 0
    lines = [line for line in out.splitlines() if best_name(runs / "a") in line]
    assert len(lines) == 1 and "*" in lines[0]
    for column in ("saved as", "epoch", "step", "val_acc", "val_loss", "train_loss", "size", "age"):
        assert column in out
    assert "KiB" in out
    code, _, err = cli(capsys, "ls", runs / "a", "-m", "train_los")
    assert code == 2
    assert_one_line_error(err, "Did you mean 'train_loss'?")


def test_ls_without_rich_prints_aligned_plain_text(runs, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    code, out, _ = cli(capsys, "ls", runs / "a", "--metric", "train_acc")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("file"))
    rows = lines[lines.index(header) + 1 :]
    assert len(rows) == 4 and rows[0].startswith("*") and best_name(runs / "a") in rows[0]
    assert "train_acc" in header and "train_loss" not in header
    assert not any(c in out for c in "┃│┏")
    # Columns line up: each header name ends where right-aligned numbers end.
    end = header.index("epoch") + len("epoch")
    assert all(row[end - 1].isdigit() and row[end] == " " for row in rows)


def test_ls_all_adds_the_evicted_checkpoints_from_the_history(runs, capsys) -> None:
    code, out, _ = cli(capsys, "ls", runs / "a", "--all", "--json")
    assert code == 0
    rows = json.loads(out)["checkpoints"]
    evicted = [r for r in rows if r["status"] == "evicted"]
    assert [r["epoch"] for r in evicted] == [4, 1, 2, 0]  # best first
    assert all(not (Path(runs / "a") / r["file"]).exists() for r in evicted)
    assert evicted[0]["score"] == ACCS[4] and evicted[0]["evicted_at_epoch"] == 6
    code, out, _ = cli(capsys, "ls", runs / "a", "-a")
    assert code == 0 and out.count("evicted") == 4


# -- show ------------------------------------------------------------------------------------


def test_show_prints_the_best_record_in_full(runs, capsys) -> None:
    code, out, _ = cli(capsys, "show", runs / "a")
    assert code == 0
    assert best_name(runs / "a") in out and "(best)" in out
    for text in (
        "val_loss",
        "train_loss",
        "train_acc",
        "sha256",
        "copied into host memory (two sets fit)",  # how it was staged
        "framework",
        "torch",
        str(load_manifest(runs / "a").run["id"]),
    ):
        assert text in out


def test_show_a_given_file_by_name_path_or_sidecar(runs, capsys) -> None:
    kept = load_manifest(runs / "a").kept
    other = next(r for r in kept if r.epoch == 3)
    for arg in (
        [runs / "a", other.name],
        [runs / "a", run_folder(runs / "a") / f"{Path(other.name).stem}.json"],  # its record
        [other.path],
    ):
        code, out, _ = cli(capsys, "show", *arg, "--json")
        assert code == 0
        record = json.loads(out)
        assert (record["epoch"], record["best"], record["path"]) == (3, False, other.path)
        assert record["metrics"]["val_acc"] == ACCS[3]
    code, out, _ = cli(capsys, "show", runs / "a", "last.pth", "--json")
    assert json.loads(out)["kind"] == "last"


def test_show_an_unknown_file_is_a_one_line_error(runs, capsys) -> None:
    code, _, err = cli(capsys, "show", runs / "a", "epoch=000-val_acc=0.5000.pth")
    assert code == 2
    assert_one_line_error(err, "is not kept", best_name(runs / "a"), "ls --all")


# -- plot ------------------------------------------------------------------------------------


def test_plot_writes_a_png_that_matplotlib_reads_back(runs, capsys, tmp_path) -> None:
    out_file = tmp_path / "curve.png"
    code, out, _ = cli(capsys, "plot", runs / "a", "-o", out_file, "--metric", "val_loss")
    assert code == 0 and str(out_file) in out
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out_file)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


def test_plot_writes_svg_with_the_best_train_and_validation_curves(runs, capsys, tmp_path):
    out_file = tmp_path / "curve.svg"
    assert cli(capsys, "plot", runs / "a", "-o", out_file, "-m", "val_loss")[0] == 0
    text = out_file.read_text()
    ET.fromstring(text)  # well-formed
    # Legends: the monitor beside its training counterpart, the kept ones, the best epoch.
    for label in (
        "val_acc",
        "train_acc",
        "val_loss",
        "train_loss",
        f"best: epoch {BEST_EPOCH}, {ACCS[BEST_EPOCH]}",
        "kept (2)",
    ):
        assert f"<!-- {label} -->" in text


def test_plot_rejects_unknown_metrics_and_formats_with_a_fix(runs, capsys, tmp_path) -> None:
    code, _, err = cli(capsys, "plot", runs / "a", "-o", tmp_path / "c.png", "-m", "val_los")
    assert code == 2
    assert_one_line_error(err, "'val_los'", "Did you mean 'val_loss'?")
    code, _, err = cli(capsys, "plot", runs / "a", "-o", tmp_path / "c.jpeg")
    assert code == 2
    assert_one_line_error(err, ".png", ".svg")
    assert not (tmp_path / "c.png").exists()


# -- verify ----------------------------------------------------------------------------------


def test_verify_passes_on_an_intact_run(runs, capsys) -> None:
    code, out, _ = cli(capsys, "verify", runs / "a", runs / "b")
    assert code == 0
    assert out.count("ok: ") == 2


def test_verify_fails_on_a_corrupted_checkpoint(run, capsys) -> None:
    best = run / best_name(run)
    data = bytearray(best.read_bytes())
    data[len(data) // 2] ^= 0xFF
    best.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify", run)
    assert code == 1
    assert "checksum" in out and best.name in out and "1 problem" in out


def test_verify_fails_on_missing_extra_and_leftover_files(run, capsys) -> None:
    kept = next(r for r in load_manifest(run).kept if r.epoch == 3)
    Path(kept.path).unlink()
    shutil.copy(run / best_name(run), run / "epoch=099-stray.pth")
    # Temporary files are written in the run's folder; one beside the checkpoints is a leftover
    # too.
    folder = run_folder(run)
    (folder / f"{TMP_PREFIX}deadbeef-epoch=007.pth").write_bytes(b"half a checkpoint")
    (run / f"{TMP_PREFIX}cafe-epoch=008.pth").write_bytes(b"half a checkpoint")
    code, out, _ = cli(capsys, "verify", run, "--json")
    assert code == 1
    [report] = json.loads(out)
    found = {(p["kind"], p["name"]) for p in report["problems"]}
    assert found == {
        ("missing", kept.name),
        ("extra", "epoch=099-stray.pth"),
        ("leftover", f".bestsave/{folder.name}/{TMP_PREFIX}deadbeef-epoch=007.pth"),
        ("leftover", f"{TMP_PREFIX}cafe-epoch=008.pth"),
    }
    assert report["ok"] is False


# -- soup and compare ------------------------------------------------------------------------


def test_soup_writes_the_average_and_lists_the_members(runs, capsys, tmp_path) -> None:
    out_file = tmp_path / "soup.pth"
    code, out, err = cli(capsys, "soup", runs / "a", "-o", out_file, "--top", "2")
    assert code == 0 and err == ""
    assert "averaged 2 checkpoints" in out and str(out_file) in out
    soup = torch.load(out_file, weights_only=True)["model"]
    members = [
        torch.load(r.path, weights_only=True)["model"] for r in load_manifest(runs / "a").kept[:2]
    ]
    torch.testing.assert_close(
        soup["0.weight"], (members[0]["0.weight"] + members[1]["0.weight"]) / 2
    )


def test_soup_of_a_corrupted_checkpoint_fails_with_exit_code_1(run, capsys, tmp_path) -> None:
    (run / best_name(run)).write_bytes(b"garbage")
    code, _, err = cli(capsys, "soup", run, "-o", tmp_path / "soup.pth")
    assert code == 1
    assert_one_line_error(err, "does not match its record")
    assert not (tmp_path / "soup.pth").exists()


def test_compare_shows_the_best_of_each_run(runs, capsys) -> None:
    code, out, _ = cli(capsys, "compare", runs / "a", runs / "b", "--json")
    assert code == 0
    a, b = json.loads(out)
    assert (a["run"], a["epoch"], a["score"], a["winner"]) == ("a", BEST_EPOCH, 0.9, False)
    assert (b["run"], b["epoch"], b["score"], b["winner"]) == ("b", 1, 0.95, True)
    assert a["id"] == load_manifest(runs / "a").run["id"] and a["framework"] == "torch"
    code, out, _ = cli(capsys, "compare", runs / "a", runs / "b")
    assert code == 0
    line_b = next(line for line in out.splitlines() if " b " in line)
    assert "*" in line_b and "0.95" in line_b


# -- errors and entry points -----------------------------------------------------------------


def test_a_directory_without_a_run_is_a_one_line_error_with_a_fix(runs, capsys, tmp_path):
    for command in ("ls", "show", "plot", "verify", "compare"):
        code, _, err = cli(capsys, command, tmp_path)
        assert code == 2
        assert_one_line_error(err, "no bestsave run", "dirpath")
    code, _, err = cli(capsys, "ls", runs)  # the folder above the runs
    assert code == 2
    assert_one_line_error(err, "a, b", "bestsave compare")


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["soup", "somewhere", "-o", "x.pth", "--top", "0"])
    assert exit_info.value.code == 2
    assert "--top" in capsys.readouterr().err


def test_the_console_script_and_python_m_bestsave(runs) -> None:
    script = shutil.which("bestsave", path=os.path.dirname(sys.executable))
    assert script is not None, "the bestsave console script is not installed"
    done = subprocess.run(
        [script, "ls", "--json", str(runs / "a")], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout)["best"] == best_name(runs / "a")
    done = subprocess.run(
        [sys.executable, "-m", "bestsave", "verify", str(runs / "a")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.startswith("ok: ")
    done = subprocess.run(
        [sys.executable, "-m", "bestsave", "show", str(runs / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("bestsave: error: no bestsave run")
