"""Sessions: tests (everything), core (no framework), lint, typecheck, demo, bench, stress."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

TEST_TOOLS = [
    "pytest>=8",
    "hypothesis>=6.100",
    "build>=1.2",
    "setuptools>=69",
    "wheel",
    "scikit-learn>=1.3",
    "torchmetrics>=1.3",
    "jax[cpu]>=0.4.30",
    "moto[server]>=5",
    # boto3 through aiobotocore (s3fs's client), which pins the botocore it works with: a bare
    # boto3 newer than that pin sends pip backtracking through every aiobotocore and torch.
    "aiobotocore[boto3]",
    "h5py",
]


def install_all(session: nox.Session) -> None:
    # torch first and alone: pip takes the local build where the machine has one.
    session.install("torch>=2.2")
    session.install("-e", ".[all]", *TEST_TOOLS)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite with every framework installed (what CI runs)."""
    install_all(session)
    session.run(
        "pytest",
        "-q",
        "-m",
        "not slow",
        "-p",
        "no:cacheprovider",
        "--doctest-modules",
        *(session.posargs or ["bestsave", "adapters", "tests"]),
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "KERAS_BACKEND": "torch"},
    )


@nox.session
def core(session: nox.Session) -> None:
    """The core's tests with no framework installed."""
    session.install(".", "pytest>=8", "hypothesis>=6.100", "fsspec")
    session.run(
        "pytest", "-q", "-m", "core", "-p", "no:cacheprovider", "tests/unit", *session.posargs
    )
    session.run("python", "-c", "import bestsave, bestsave.trackers; print('core imports alone')")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install_all(session)
    session.install("mypy>=1.10")
    session.run("mypy", "bestsave", "adapters")


@nox.session
def demo(session: nox.Session) -> None:
    """Train the fraud-like example and show what was kept."""
    session.install("torch>=2.2")
    session.install("-e", ".[torch]", "scikit-learn>=1.3", "torchmetrics>=1.3")
    session.run(
        "python", "examples/torch_imbalanced_auroc.py", "--dir", "runs/demo", *session.posargs
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Time bestsave against each framework's own checkpoint callback."""
    install_all(session)
    session.run(
        "python",
        "tests/benchmarks/run.py",
        *session.posargs,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    session.run("python", "tests/benchmarks/decisions.py")


@nox.session
def stress(session: nox.Session) -> None:
    """The kill test at full count (300 SIGKILLs)."""
    install_all(session)
    session.run(
        "pytest",
        "-q",
        "-m",
        "slow",
        "-p",
        "no:cacheprovider",
        "tests",
        *session.posargs,
        env={"BESTSAVE_KILLS": "300"},
    )
