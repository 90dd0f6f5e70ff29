"""The wheel installs bestsave and bestsave.adapters from the adapters/ folder."""

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), ROOT],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("bestsave-*.whl")
    return path


def test_wheel_holds_core_adapters_and_type_marker(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "bestsave/__init__.py",
        "bestsave/saver.py",
        "bestsave/py.typed",
        "bestsave/adapters/__init__.py",
        "bestsave/adapters/torch.py",
    ):
        assert name in names
    assert not any(n.startswith("adapters/") or n.startswith("tests/") for n in names)


def test_wheel_imports_in_a_fresh_environment(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    # torch comes from this environment, read after the fresh one's own packages;
    # a .pth file does not activate this environment's editable install of bestsave.
    with open(os.path.join(target, "zz_frameworks.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import bestsave, bestsave.adapters.torch as t, sys;"
        "print(bestsave.__file__); print(t.TorchCheckpointer.__name__)"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path, name = out.stdout.split()
    assert path.startswith(str(env_dir)) and name == "TorchCheckpointer"
