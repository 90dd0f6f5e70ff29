"""Sessions: tests (everything), core (no framework), lint, typecheck, demo, bench, stress,
dropin (each framework's own checkpoint tests against bestsave's classes)."""

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
    # Keras's default backend, the one most Keras users train on.
    "tensorflow-cpu",
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
    session.run("python", "tests/benchmarks/budget.py")
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


# What Lightning's own tests need beyond the suite's tools (its requirements/pytorch/test.txt).
LIGHTNING_TEST_TOOLS = [
    "pytest-timeout",
    "pytest-xdist",
    "pytest-rerunfailures",
    "psutil",
    "tensorboard",
    "tensorboardX>=2.2,<2.7.0",
    "huggingface-hub",
    "omegaconf>=2.2.3,<2.4.0",
    "hydra-core>=1.2.0,<1.4.0",
]


@nox.session
def dropin(session: nox.Session) -> None:
    """Each framework's own checkpoint tests, with bestsave's class swapped in.

    Keras's come with its wheel. Lightning's and fastai's are not shipped: pass a clone of
    Lightning (``--lightning DIR``, a checkout or bare repository; the suite takes the tests at
    the tag it names, the one measured in the README) and fastai's
    ``nbs/17_callback.tracker.ipynb`` (``--fastai FILE``)::

        nox -s dropin -- --lightning ../pytorch-lightning \\
            --fastai ../fastai/nbs/17_callback.tracker.ipynb
    """
    install_all(session)
    session.install(*LIGHTNING_TEST_TOOLS)
    args = list(session.posargs)
    session.run("python", "tests/dropin/keras_suite.py", "--compare")
    if "--lightning" in args:
        repo = args[args.index("--lightning") + 1]
        out = "runs/dropin/lightning"
        for label in ("stock", "ours"):
            session.run(
                "python", "tests/dropin/lightning_suite.py", "--repo", repo,
                "--out", f"{out}-{label}", "-n", "2", *(["--stock"] if label == "stock" else []),
                success_codes=[0, 1],
            )  # fmt: skip
        session.run(
            "python", "tests/dropin/lightning_suite.py", "--compare",
            f"{out}-stock/junit.xml", f"{out}-ours/junit.xml", success_codes=[0, 1],
        )  # fmt: skip
    if "--fastai" in args:
        notebook = args[args.index("--fastai") + 1]
        session.run("python", "tests/dropin/fastai_suite.py", "--notebook", notebook, "--compare")
