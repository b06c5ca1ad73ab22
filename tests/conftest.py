"""Shared fixtures and markers. GPU tests are skipped cleanly where there is no GPU."""

import pytest
import torch


def _has_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
