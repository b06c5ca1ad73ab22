"""factorize --resume: a run killed after k layers continues from its journal and writes
the artifact an uninterrupted run writes, tensor for tensor."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lyoncompress.errors import InputError
from lyoncompress.factorization import calibrated, pipeline
from lyoncompress.factorization import journal as journal_module
from lyoncompress.factorization.journal import journal_path
from lyoncompress.output import claim_output
from lyoncompress.recipe import Recipe
from tests.helpers import Killed, assert_same_artifact, dying_after, make_mlp_checkpoint

REPO = Path(__file__).resolve().parents[1]


WEIGHT = Recipe(method="monarch")
FAST = {"calib": "builtin", "refine_steps": 5, "calib_samples": 256}
MODES = {
    "weight-only": (WEIGHT, pipeline, "factorize_layer"),
    "calibrated": (Recipe(**FAST), calibrated, "calibrated_layer"),
    "sequential": (Recipe(**FAST, sequential=True), calibrated, "calibrated_layer"),
    "allocated": (Recipe(**FAST, allocate="sensitivity"), calibrated, "calibrated_layer"),
    "sequential-allocated": (
        Recipe(**FAST, sequential=True, allocate="sensitivity"),
        calibrated,
        "calibrated_layer",
    ),
    "distilled": (Recipe(**FAST, distill_steps=4), calibrated, "calibrated_layer"),
    # each structure's best fit is journaled too: the resumed selection sees the same candidates
    "distill-selected": (
        Recipe(**FAST, distill_steps=4, distill_select_steps=2),
        calibrated,
        "calibrated_layer",
    ),
    "permuted": (WEIGHT.replace(permute=True), pipeline, "factorize_layer"),
    "permuted-calibrated": (Recipe(**FAST, permute=True), calibrated, "calibrated_layer"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resumed_run_writes_the_uninterrupted_artifact(tmp_path, monkeypatch, mode):
    recipe, module, fit = MODES[mode]
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    pipeline.factorize(ckpt, tmp_path / "whole", recipe)
    assert not journal_path(tmp_path / "whole").exists()  # removed after the write

    dying_after(monkeypatch, module, fit, layers=1)
    with pytest.raises(Killed):
        pipeline.factorize(ckpt, tmp_path / "out", recipe)
    assert not (tmp_path / "out").exists()
    assert len(list(journal_path(tmp_path / "out").glob("layer-*.safetensors"))) == 1

    calls = dying_after(monkeypatch, module, fit, layers=None)
    report = pipeline.factorize(ckpt, tmp_path / "out", recipe, resume=True)
    assert len(calls) == report["totals"]["layers"] - 1  # the journaled layer is not fitted again
    assert any("resumed from" in w and "1 layer(s)" in w for w in report["warnings"])
    assert_same_artifact(tmp_path / "whole", tmp_path / "out")
    assert not journal_path(tmp_path / "out").exists()


def test_resume_refuses_a_journal_of_another_recipe(tmp_path, monkeypatch, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    dying_after(monkeypatch, pipeline, "factorize_layer", layers=1)
    with pytest.raises(Killed):
        pipeline.factorize(ckpt, tmp_path / "out", WEIGHT)
    monkeypatch.undo()
    args = ["factorize", ckpt, "-o", tmp_path / "out", "--method", "monarch", "--budget", "0.3"]
    result = cli(*args, "--resume")
    assert result.exit_code == 2
    assert "different recipe or checkpoint" in result.output and "without --resume" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert journal_path(tmp_path / "out").exists()  # left for a resume with the right recipe


def test_resume_refuses_a_journal_of_a_changed_checkpoint(tmp_path, monkeypatch):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    dying_after(monkeypatch, pipeline, "factorize_layer", layers=1)
    with pytest.raises(Killed):
        pipeline.factorize(ckpt, tmp_path / "out", WEIGHT)
    monkeypatch.undo()
    make_mlp_checkpoint(tmp_path / "ckpt", seed=1)  # same names and shapes, new file
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    with pytest.raises(InputError, match="different recipe or checkpoint"):
        pipeline.factorize(ckpt, tmp_path / "out", WEIGHT, resume=True)


def test_without_resume_an_old_journal_is_replaced_with_a_warning(tmp_path, monkeypatch, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    dying_after(monkeypatch, pipeline, "factorize_layer", layers=1)
    with pytest.raises(Killed):
        pipeline.factorize(ckpt, tmp_path / "out", WEIGHT)
    calls = dying_after(monkeypatch, pipeline, "factorize_layer", layers=None)
    report = pipeline.factorize(ckpt, tmp_path / "out", WEIGHT.replace(budget=0.3))
    assert len(calls) == report["totals"]["layers"]
    assert any("replaced the journal" in w for w in report["warnings"])


def test_resume_without_a_journal_starts_from_the_first_layer(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--method", "monarch", "--resume")
    assert result.exit_code == 0, result.output
    assert "no journal" in result.output


def test_resume_does_not_apply_to_the_budget_search(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("factorize", ckpt, "-o", tmp_path / "out", "--min-recovery", "0.9", "--resume")
    assert result.exit_code == 2 and "budget search" in result.output


def test_stale_scratch_cleanup_leaves_the_journal(tmp_path):
    journal = journal_path(tmp_path / "out")
    journal.mkdir()
    dead = tmp_path / ".out.tmp-999999999"
    dead.mkdir()
    with claim_output(tmp_path / "out", force=False) as output:
        assert any("scratch" in note for note in output.notes)
    assert journal.is_dir() and not dead.exists()


_KILLED_RUN = """
import os, signal, sys
from lyoncompress import cli
from lyoncompress.factorization import pipeline
real, calls = pipeline.factorize_layer, []
def dying(*args):
    if calls:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return real(*args)
pipeline.factorize_layer = dying
sys.argv = ["lyoncompress", "factorize", *sys.argv[1:]]
cli.main()
"""


def test_kill_9_then_resume(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    assert cli("factorize", ckpt, "-o", tmp_path / "whole", "--method", "monarch").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "OMP_NUM_THREADS": "1"}
    args = [str(ckpt), "-o", str(tmp_path / "out"), "--method", "monarch"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, *args], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / ".out.lock").is_symlink()  # the dead run's lock, taken over below
    result = cli("factorize", *args, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    assert_same_artifact(tmp_path / "whole", tmp_path / "out")


def test_bad_input_found_after_some_layers_leaves_no_journal(tmp_path):
    ckpt, model = make_mlp_checkpoint(tmp_path / "ckpt")
    state = model.state_dict()
    last = [name for name in state if name.endswith(".weight")][-2]  # a compressed, later layer
    state[last][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.bin")
    with pytest.raises(InputError, match="NaN"):
        pipeline.factorize(tmp_path / "nan.bin", tmp_path / "out", WEIGHT)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_full_disk_keeps_the_journal_for_resume(tmp_path, monkeypatch):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    pipeline.factorize(ckpt, tmp_path / "whole", WEIGHT)
    real, written = journal_module._write_atomic, []

    def full_after_one_layer(path, data):
        if path.name.startswith("layer-"):
            if written:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(path)
        real(path, data)

    monkeypatch.setattr(journal_module, "_write_atomic", full_after_one_layer)
    with pytest.raises(InputError, match="No space left"):
        pipeline.factorize(ckpt, tmp_path / "out", WEIGHT)
    monkeypatch.undo()
    assert len(list(journal_path(tmp_path / "out").glob("layer-*.safetensors"))) == 1
    pipeline.factorize(ckpt, tmp_path / "out", WEIGHT, resume=True)
    assert_same_artifact(tmp_path / "whole", tmp_path / "out")


def test_a_journal_killed_before_its_first_entry_resumes_from_the_start(tmp_path):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    journal_path(tmp_path / "out").mkdir()  # journal.json never written
    report = pipeline.factorize(ckpt, tmp_path / "out", WEIGHT, resume=True)
    assert any("0 layer(s)" in w for w in report["warnings"])
    assert not journal_path(tmp_path / "out").exists()


def test_the_journal_keeps_finished_layers_on_disk_not_in_memory(tmp_path):
    from lyoncompress.factorization.journal import FinishedLayer, Journal
    from lyoncompress.factorization.methods import fit_weight

    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    factors = fit_weight("lowrank", weight, 0.5, 2, "left-to-right")
    journal, _ = Journal.open(tmp_path / "out", "stamp", resume=False)
    journal.record(FinishedLayer("fc1", factors, 1.5, 0.5), {"name": "fc1"}, {})
    assert list(journal.done) == ["fc1"] and not journal.done._held  # only the file is held
    first, second = journal.done["fc1"], journal.done["fc1"]
    assert first.factors is not second.factors  # read again at each access
    for read in (first.factors, second.factors):
        assert all(torch.equal(a, b) for a, b in zip(read.twiddles, factors.twiddles, strict=True))
        assert read.chain == factors.chain and read.rel_error == factors.rel_error
    reopened, _ = Journal.open(tmp_path / "out", "stamp", resume=True)
    assert torch.equal(reopened.done["fc1"].factors.twiddles[0], factors.twiddles[0])
