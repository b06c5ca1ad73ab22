"""The report's phases (seconds, peak memory) and the progress bar's ETA across phases."""

import pytest

from lyoncompress.cli import _LayerProgress
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.recipe import Recipe
from lyoncompress.report import peak_rss_bytes
from tests.helpers import make_mlp_checkpoint


@pytest.mark.parametrize(
    "recipe,phases",
    [
        (Recipe(method="monarch"), ["plan", "fit and write"]),
        (
            Recipe(calib="builtin", refine_steps=5, calib_samples=256, distill_steps=3, permute=True),
            ["plan", "permute", "calibrated fits", "distill", "write"],
        ),
    ],
    ids=["weight-only", "calibrated"],
)
def test_report_has_seconds_and_peak_memory_per_phase(tmp_path, recipe, phases):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    report = factorize(ckpt, tmp_path / "out", recipe)
    assert [row["phase"] for row in report["phases"]] == phases
    peaks = [row["peak_rss_mb"] for row in report["phases"]]
    assert peaks == sorted(peaks) and 0 < peaks[-1] <= peak_rss_bytes() / 2**20 + 0.1  # rounded to 0.1 MiB
    assert all(row["seconds"] >= 0 for row in report["phases"])


def test_progress_restarts_its_count_for_each_phase():
    with _LayerProgress(True, "factorizing") as progress:
        for done in (1, 2):
            progress("pairs", done, 2)
        for done in (1, 2, 3):
            progress("fc", done, 3)
        task = progress.progress.tasks[0]
        assert (task.completed, task.total) == (3, 3)
