"""``torchrun --nproc-per-node 2 -m lyoncompress factorize``: two CPU ranks (gloo) share
the layer fits and rank 0 writes the artifact one process writes, byte for byte; a bad
input on any rank makes every rank exit 2, at once."""

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lyoncompress.distributed import BACKENDS, Ranks, backend_for, launched_ranks, shared_out
from lyoncompress.errors import InputError
from lyoncompress.factorization import pipeline
from lyoncompress.factorization.journal import journal_path
from lyoncompress.recipe import Recipe
from tests.helpers import Killed, assert_same_artifact, dying_after, make_mlp_checkpoint

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds; a hanging rank fails the test instead of the suite
FAST = ["--calib", "builtin", "--refine-steps", "5", "--calib-samples", "256"]
RUNS = {
    "weight-only": ["--method", "monarch"],
    "calibrated": FAST,
    "allocated-distilled": [*FAST, "--allocate", "sensitivity", "--distill-steps", "4"],
}


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "OMP_NUM_THREADS": "1", **extra}


def _factorize(*args, nproc=1):
    """The command line in a fresh process, or under torchrun with ``nproc`` ranks."""
    launcher = (
        [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    )
    command = [sys.executable, *launcher, "-m", "lyoncompress", "factorize", *map(str, args)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}


def _without_seconds(report):
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in report["layers"]]
    return rows, report["totals"], report.get("allocation"), report.get("distill")


@pytest.mark.parametrize("run", sorted(RUNS))
def test_two_ranks_write_the_one_process_artifact_byte_for_byte(tmp_path, run):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    one = _factorize(ckpt, "-o", tmp_path / "one", *RUNS[run])
    two = _factorize(ckpt, "-o", tmp_path / "two", *RUNS[run], nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    # every file but the report (which holds timings) is the same bytes: tensors, metadata, config
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert_same_artifact(tmp_path / "one", tmp_path / "two")
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert _without_seconds(reports[0]) == _without_seconds(reports[1])
    assert two.stderr.count("wrote ") == 1  # only rank 0 prints the summary
    assert not journal_path(tmp_path / "two").exists()


def test_two_ranks_resume_the_journal_of_a_one_process_run(tmp_path, monkeypatch):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    recipe = Recipe(method="monarch")
    pipeline.factorize(ckpt, tmp_path / "whole", recipe)
    dying_after(monkeypatch, pipeline, "factorize_layer", layers=1)
    with pytest.raises(Killed):
        pipeline.factorize(ckpt, tmp_path / "out", recipe)
    resumed = _factorize(ckpt, "-o", tmp_path / "out", "--method", "monarch", "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "1 layer(s)" in resumed.stderr
    assert_same_artifact(tmp_path / "whole", tmp_path / "out")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# rank 1 fails as its first layer fit starts: SIGKILLed (FAIL=kill) or with a bug (FAIL=bug)
_FAILING_RANK = """
import os, signal, sys
from lyoncompress import cli
from lyoncompress.factorization import pipeline
def failing(*args):
    if os.environ["FAIL"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ZeroDivisionError("a bug")
if os.environ["RANK"] == "1":
    pipeline.factorize_layer = failing
sys.argv = ["lyoncompress", "factorize", *sys.argv[1:]]
cli.main()
"""


def _ranks_by_hand(*args, world=2, fail=None):
    """Start ``world`` ranks as torchrun would (its environment variables), without the
    launcher, which stops the other ranks once one exits: each rank's exit code is seen.
    ``fail`` makes rank 1 fail (see ``_FAILING_RANK``)."""
    port = str(_free_port())
    logs = [tempfile.TemporaryFile() for _ in range(world)]  # no pipe to fill while a rank waits
    program = ["-m", "lyoncompress", "factorize"] if fail is None else ["-c", _FAILING_RANK]
    ranks = [
        subprocess.Popen(
            [sys.executable, *program, *map(str, args)],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                FAIL=fail or "",
            ),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for r, log in enumerate(logs)
    ]
    codes = [rank.wait(timeout=TIMEOUT) for rank in ranks]
    for log in logs:
        log.seek(0)
    return [(code, log.read().decode()) for code, log in zip(codes, logs)]


def _nan_checkpoint(tmp_path, layer):
    ckpt, model = make_mlp_checkpoint(tmp_path / "ckpt")
    state = model.state_dict()
    state[f"{layer}.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.bin")
    return tmp_path / "nan.bin"


BAD_INPUTS = {
    # found by rank 0 alone, before any fit: the other rank learns it at the first agreement
    "out exists": lambda tmp_path: (make_mlp_checkpoint(tmp_path / "ckpt")[0], "exists", True),
    # found by the rank that fits the layer (the larger fc2 is rank 0's, fc1 rank 1's)
    "nan weight found by rank 0": lambda tmp_path: (_nan_checkpoint(tmp_path, "fc2"), "NaN", False),
    "nan weight found by rank 1": lambda tmp_path: (_nan_checkpoint(tmp_path, "fc1"), "NaN", False),
    "sequential": lambda tmp_path: (make_mlp_checkpoint(tmp_path / "ckpt")[0], "--sequential", False),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_input_on_any_rank_exits_2_on_every_rank(tmp_path, case):
    ckpt, message, out_exists = BAD_INPUTS[case](tmp_path)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    extra = [*FAST, "--sequential"] if case == "sequential" else ["--method", "monarch"]
    (code0, err0), (code1, err1) = _ranks_by_hand(ckpt, "-o", out, *extra)
    assert (code0, code1) == (2, 2), (err0, err1)
    assert err0.count("error:") == 1 and message in err0, err0  # rank 0 says it, once
    assert ("rank 1:" in err0) == case.endswith("rank 1"), err0  # naming the rank it came from
    assert "error" not in err1 and "Traceback" not in err1, err1  # the others print nothing
    assert out_exists == out.exists()  # nothing written (or the existing folder left alone)
    assert not journal_path(out).exists()  # a bad input keeps no journal
    assert not (tmp_path / ".out.lock").is_symlink()  # the lock is released


def test_a_bug_on_one_rank_exits_3_on_every_rank_and_keeps_the_journal(tmp_path):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    (code0, err0), (code1, err1) = _ranks_by_hand(
        ckpt, "-o", tmp_path / "out", "--method", "monarch", fail="bug"
    )
    assert (code0, code1) == (3, 3), (err0, err1)
    assert "ZeroDivisionError: a bug" in err1 and "Traceback" in err1  # the failing rank's traceback
    assert "error: rank 1: ZeroDivisionError: a bug" in err0 and "Traceback" not in err0
    assert not (tmp_path / "out").exists()
    assert journal_path(tmp_path / "out").exists()  # not a bad input: the run can resume


def test_a_killed_rank_stops_the_others_and_the_run_resumes(tmp_path):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    args = ["-o", tmp_path / "out", "--method", "monarch"]
    (code0, err0), (code1, _) = _ranks_by_hand(ckpt, *args, fail="kill")
    assert code1 == -9 and code0 == 3, err0  # rank 0 noticed at once (no wait for a timeout)
    assert "another rank stopped without reporting" in err0
    assert len(list(journal_path(tmp_path / "out").glob("layer-*.safetensors"))) == 1  # rank 0's layer
    whole = _factorize(ckpt, "-o", tmp_path / "whole", "--method", "monarch")
    resumed = _factorize(ckpt, *args, "--resume")
    assert whole.returncode == resumed.returncode == 0, resumed.stderr
    assert "1 layer(s) already done" in resumed.stderr
    assert_same_artifact(tmp_path / "whole", tmp_path / "out")


def test_one_process_per_backend():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda")) == "nccl"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert set(BACKENDS) == {"cpu", "cuda"}
    with pytest.raises(InputError, match="no torch.distributed backend for device meta"):
        backend_for(torch.device("meta"))


def test_launched_ranks_read_torchruns_environment():
    assert launched_ranks({}) == Ranks(0, 1)
    assert launched_ranks({"RANK": "3", "WORLD_SIZE": "4"}) == Ranks(3, 4)
    assert launched_ranks({"RANK": "0", "WORLD_SIZE": "4"}).leader
    assert not launched_ranks({"RANK": "1", "WORLD_SIZE": "2"}).leader
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(InputError, match="RANK|WORLD_SIZE"):
            launched_ranks(bad)


def _best_largest_load(sizes, world):
    """Brute force: the smallest largest per-rank load over every assignment."""
    best = None
    for owners in itertools.product(range(world), repeat=len(sizes)):
        loads = [sum(s for s, o in zip(sizes, owners) if o == rank) for rank in range(world)]
        best = max(loads) if best is None else min(best, max(loads))
    return best


@pytest.mark.parametrize(
    "sizes, world",
    [
        ([4, 3, 2, 1], 2),
        ([5, 5, 4, 3, 3], 2),
        ([7, 1, 1, 1, 1, 1, 1, 1], 2),
        ([6, 5, 4, 3, 2, 1], 3),
        ([9], 3),
    ],
)
def test_shared_out_balances_the_layers_by_size(sizes, world):
    names = [f"layer{i}" for i in range(len(sizes))]
    owners = shared_out(dict(zip(names, sizes)), world)
    assert list(owners) == names and set(owners.values()) <= set(range(world))
    loads = [sum(s for n, s in zip(names, sizes) if owners[n] == rank) for rank in range(world)]
    # largest-first greedy is within 4/3 of the best assignment (Graham's bound)
    assert max(loads) <= 4 / 3 * _best_largest_load(sizes, world)
    assert shared_out(dict(zip(names, sizes)), world) == owners  # the same sizes, the same shares


def test_shared_out_of_the_docstring_example():
    assert shared_out({"a": 4, "b": 3, "c": 2, "d": 1}, 2) == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert shared_out({}, 2) == {}
