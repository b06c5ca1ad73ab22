"""Shared fixtures and markers. GPU tests are skipped cleanly where there is no GPU."""

import pytest
import torch


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    # `cuda`: torch on a CUDA device only; `gpu`: the CuPy kernels too
    cuda = torch.cuda.is_available()
    missing = {"cuda": not cuda, "gpu": not (cuda and _has_cupy())}
    reasons = {"cuda": "needs a CUDA GPU", "gpu": "needs a CUDA GPU with CuPy"}
    for item in items:
        for marker in ("gpu", "cuda"):
            if missing[marker] and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))
                break


@pytest.fixture(scope="session")
def cli():
    """Run the ``lyoncompress`` command line in-process through typer's ``CliRunner``:
    ``cli("eval", artifact, "--json")`` returns the ``Result``. Arguments are passed
    through ``str``; ``CI=true`` turns progress bars off and ``HF_HUB_OFFLINE=1`` keeps
    transformers off the network; ``env`` adds variables."""
    from typer.testing import CliRunner

    from lyoncompress.cli import app

    runner = CliRunner()

    def invoke(*args, env=None):
        return runner.invoke(
            app, [str(a) for a in args], env={"CI": "true", "HF_HUB_OFFLINE": "1", **(env or {})}
        )

    return invoke


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
