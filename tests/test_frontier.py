"""frontier: bytes of the written artifacts, Pareto marking, the CLI."""

import json
import math
import os
import random
from dataclasses import asdict

import pytest
from safetensors import safe_open

from lyoncompress.frontier import (
    FrontierConfig,
    Point,
    file_bytes,
    frontier,
    pareto_flags,
    tensor_bytes,
    verdict,
)
from lyoncompress.quantization.pipeline import quantize
from lyoncompress.recipe import QuantizeConfig
from tests.helpers import make_mlp_checkpoint


def _brute_force(points):
    return [
        not any(
            q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])
            for j, q in enumerate(points)
            if j != i
        )
        for i, p in enumerate(points)
    ]


@pytest.mark.parametrize("seed", range(20))
def test_pareto_flags_vs_brute_force(seed):
    rng = random.Random(seed)
    # few distinct values, so that ties of size, of metric and of both occur
    points = [(rng.randint(1, 6), rng.randint(0, 5) / 5) for _ in range(rng.randint(1, 15))]
    assert pareto_flags(points) == _brute_force(points)


def test_pareto_flags_edge_cases():
    assert pareto_flags([]) == []
    assert pareto_flags([(1, 0.5), (1, 0.5)]) == [True, True]
    assert pareto_flags([(1, 0.5), (2, 0.5), (3, 0.9)]) == [True, False, True]


def _point(label, kind, size, metric):
    return Point(label, kind, "int8", "none", None, None, None, size, size, metric)


def test_verdict_names_wins_and_dominating_dense_points():
    points = [
        _point("d8", "dense", 100, 0.99),
        _point("d4", "dense", 60, 0.90),
        _point("f-small", "factorized", 50, 0.995),  # beats both dense points, which are larger
        _point("f-mid", "factorized", 80, 0.92),  # beats d4 (smaller) but not d8 (larger, better)
        _point("f-huge", "factorized", 200, 0.5),  # no dense point as large
    ]
    found = verdict(points)
    assert found["factorized_wins"] == ["f-small"]
    assert found["no_dense_point_as_large"] == ["f-huge"]
    assert found["dominated_by_dense"] == {"f-huge": "d4"}


def test_bytes_are_the_tensor_bytes_of_the_written_artifact(tmp_path):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "q"
    quantize(ckpt, out, QuantizeConfig(format="int4", group_size=32, dense=True, include_dense=("re:.*",)))
    total = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            total += tensor.numel() * tensor.element_size()
    assert tensor_bytes(out) == total
    assert total < file_bytes(out) == (out / "model.safetensors").stat().st_size


def test_config_refuses_unknown_names():
    from lyoncompress.errors import InputError

    with pytest.raises(InputError, match="unknown method"):
        FrontierConfig(structures=("nope",))
    with pytest.raises(InputError):
        FrontierConfig(formats=("int3",))
    with pytest.raises(InputError, match="budget"):
        FrontierConfig(budgets=(1.5,))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("frontier")
    ckpt, _ = make_mlp_checkpoint(root / "ckpt")
    args = [
        "frontier",
        ckpt,
        "-o",
        root / "rd",
        "--structure",
        "lowrank",
        "--budget",
        "0.25",
        "--budget",
        "0.5",
    ]
    args += ["--format", "int8", "--format", "int4", "--group-size", "32", "--samples", "64", "--json"]
    result = cli(*args)
    return ckpt, root, args, result


def test_frontier_cli_measures_every_point(swept):
    ckpt, root, _, result = swept
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    labels = [p["label"] for p in document["points"]]
    assert labels == [
        "dense float (reference)",
        "dense int8 rtn",
        "dense int8 feedback",
        "dense int4 g32 rtn",
        "dense int4 g32 feedback",
        "lowrank 0.25 int8",
        "lowrank 0.25 int4",
        "lowrank 0.5 int8",
        "lowrank 0.5 int4",
    ]
    points = {p["label"]: p for p in document["points"]}
    assert points["dense float (reference)"]["bytes"] == tensor_bytes(ckpt)
    # every matrix quantized: int4 with groups is below int8, and both far below float32
    assert points["dense int4 g32 rtn"]["bytes"] < points["dense int8 rtn"]["bytes"] < tensor_bytes(ckpt) / 3
    assert points["lowrank 0.25 int8"]["bytes"] < points["lowrank 0.5 int8"]["bytes"]
    assert all(0 < p["metric"] <= 1.5 and math.isfinite(p["metric"]) for p in document["points"])
    flags = pareto_flags([(p["bytes"], p["metric"]) for p in document["points"]])
    assert [p["pareto"] for p in document["points"]] == flags
    assert (root / "rd" / "frontier.png").stat().st_size > 0
    assert json.loads((root / "rd" / "frontier.json").read_text())["points"] == document["points"]
    assert not list((root / "rd").glob(".frontier-scratch*"))


def test_frontier_reuses_measured_points_and_refuses_other_settings(swept, cli):
    ckpt, root, args, _ = swept
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["points"] == json.loads(swept[3].stdout)["points"]
    more = cli(*[a if a != "0.5" else "0.75" for a in args])
    assert more.exit_code == 0, more.output
    labels = [p["label"] for p in json.loads(more.stdout)["points"]]
    assert labels[-3:] == ["lowrank 0.5 int4", "lowrank 0.75 int8", "lowrank 0.75 int4"]
    assert len(labels) == 11  # the earlier part's points kept, the new budget's added
    other = cli(*[a if a != "64" else "32" for a in args])
    assert other.exit_code == 2
    assert "other settings" in other.output


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--structure", "nope"], "unknown method"),
        (["--format", "int3"], "int3"),
        (["--task", "perplexity"], ""),
    ],
)
def test_frontier_cli_bad_input_exits_2(tmp_path, cli, extra, message):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("frontier", ckpt, "-o", tmp_path / "rd", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "rd").exists()


def test_frontier_needs_a_runnable_model(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    result = cli("frontier", ckpt / "model.safetensors", "-o", tmp_path / "rd", "--no-plot")
    assert result.exit_code == 2, result.output


# --- the search over formats (--min-recovery, --max-bytes, --artifact) ---


def _smallest_passing(points, floor, limit=None):
    """Brute force: every measured point but the reference, the gate and size applied."""
    passing = [p for p in points if p["kind"] != "reference" and p["metric"] >= floor]
    fitting = [p for p in passing if limit is None or p["bytes"] <= limit]
    if not fitting:
        return None
    size = min(p["bytes"] for p in fitting)
    return max((p for p in fitting if p["bytes"] == size), key=lambda p: p["metric"])


def _gates(points):
    """Gates between the metrics, so that some points pass and some fail."""
    metrics = sorted({p["metric"] for p in points if p["kind"] != "reference"})
    return [(lo + hi) / 2 for lo, hi in zip(metrics, metrics[1:]) if (lo + hi) / 2 <= 1.0]


def test_choose_is_the_smallest_passing_point_vs_brute_force():
    from lyoncompress.frontier import FrontierSearch, choose

    rng = random.Random(0)
    for _ in range(50):
        points = [
            _point(f"p{i}", rng.choice(["dense", "factorized"]), rng.randint(1, 8), rng.randint(0, 10) / 10)
            for i in range(rng.randint(1, 12))
        ]
        floor = rng.choice([0.05, 0.35, 0.65, 0.95])
        limit = rng.choice([None, 3, 6])
        found = choose(points, FrontierSearch(floor, None if limit is None else f"{limit}B"))
        expected = _smallest_passing([asdict(p) for p in points], floor, limit)
        if expected is None:
            assert found["chosen"] is None and not found["passed"]
            assert found["too_large"] == any(p.metric >= floor for p in points)
        else:
            chosen = next(p for p in points if p.label == found["chosen"])
            assert (chosen.bytes, chosen.metric) == (expected["bytes"], expected["metric"])
            assert found["dense_won"] == (chosen.kind == "dense")


def test_search_over_formats_picks_the_smallest_passing_point(swept, cli, tmp_path):
    _, _, args, result = swept
    points = json.loads(result.stdout)["points"]
    for floor in _gates(points):
        found = cli(*args, "--min-recovery", f"{floor:.6f}")
        assert found.exit_code == 0, found.output
        document = json.loads(found.stdout)  # every point of the folder, earlier parts' included
        section = document["search"]
        expected = _smallest_passing(document["points"], float(f"{floor:.6f}"))
        assert (section["bytes"], section["metric"]) == (expected["bytes"], expected["metric"])
        assert section["dense_won"] == (section["kind"] == "dense")
        assert section["artifact"] is None
        assert section["passing"][0] == section["chosen"]
    # a gate that no compressed point reaches: exit 1, nothing written
    best = max(p["metric"] for p in points if p["kind"] != "reference")
    if best < 1.0:
        none = cli(*args, "--min-recovery", "1.0", "--artifact", tmp_path / "a")
        assert none.exit_code == 1, none.output
        assert not json.loads(none.stdout)["search"]["too_large"]
        assert not (tmp_path / "a").exists()


def test_max_bytes_excludes_larger_points_and_refuses_when_none_fits(swept, cli, tmp_path):
    _, _, args, _ = swept
    points = json.loads(cli(*args).stdout)["points"]
    floor = float(f"{_gates(points)[0]:.6f}")  # all but the worst point pass
    smallest = _smallest_passing(points, floor)
    limit = smallest["bytes"] - 1  # the smallest passing point no longer fits
    expected = _smallest_passing(points, floor, limit)
    found = cli(*args, "--min-recovery", str(floor), "--max-bytes", f"{limit}B")
    if expected is None:
        assert found.exit_code == 1, found.output
        assert json.loads(found.stdout)["search"]["too_large"]
    else:
        assert found.exit_code == 0, found.output
        assert json.loads(found.stdout)["search"]["bytes"] == expected["bytes"] <= limit
    tiny = cli(*args, "--min-recovery", str(floor), "--max-bytes", "1B", "--artifact", tmp_path / "a")
    assert tiny.exit_code == 1, tiny.output
    section = json.loads(tiny.stdout)["search"]
    assert section["too_large"] and section["smallest_passing_bytes"] == smallest["bytes"]
    assert not (tmp_path / "a").exists()


def test_artifact_is_rebuilt_from_an_earlier_part_and_passes(swept, cli, tmp_path):
    _, _, args, _ = swept
    points = json.loads(cli(*args).stdout)["points"]
    # the gate of the smallest point (a factorized one: low rank 0.25 int4), so that the
    # rebuild goes through factorize + quantize
    smallest = min((p for p in points if p["kind"] != "reference"), key=lambda p: p["bytes"])
    assert smallest["kind"] == "factorized"
    floor = float(f"{smallest['metric'] - 1e-6:.7f}")
    expected = _smallest_passing(points, floor)
    out = tmp_path / "chosen"
    found = cli(*args, "--min-recovery", str(floor), "--artifact", out)
    assert found.exit_code == 0, found.output
    section = json.loads(found.stdout)["search"]
    assert section["rebuilt"] and section["chosen"] == expected["label"]
    assert section["artifact_bytes"] == tensor_bytes(out) == expected["bytes"]
    assert section["artifact_metric"] == pytest.approx(expected["metric"], abs=1e-6)
    assert section["artifact_passed"]
    again = cli(*args, "--min-recovery", str(floor), "--artifact", out)
    assert again.exit_code == 2 and "exists" in again.output


def test_artifact_measured_in_this_call_is_kept_not_rebuilt(tmp_path, cli):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    args = ["frontier", ckpt, "-o", tmp_path / "rd", "--structure", "lowrank", "--budget", "0.5"]
    args += ["--format", "int8", "--samples", "64", "--no-plot", "--json", "--min-recovery", "0.5"]
    found = cli(*args, "--artifact", tmp_path / "a")
    assert found.exit_code == 0, found.output
    document = json.loads(found.stdout)
    section = document["search"]
    assert not section["rebuilt"] and section["artifact_passed"]
    chosen = next(p for p in document["points"] if p["label"] == section["chosen"])
    assert tensor_bytes(tmp_path / "a") == chosen["bytes"] == section["artifact_bytes"]
    assert section["artifact_metric"] == chosen["metric"] >= 0.5
    assert sorted(p.name for p in (tmp_path / "rd").iterdir()) == [".frontier.lock", "frontier.json"]


def test_parts_measured_at_the_same_time_into_one_folder_keep_every_point(tmp_path, monkeypatch):
    """A second part runs (here: nested, from the first one's progress callback) while the
    first is measuring: its points survive the first part's later writes, no point is
    measured twice (the first part takes the dense points the second one wrote), each
    part works in a scratch folder of its own, and a stale one (a killed part's) is removed."""
    import lyoncompress.frontier as module

    quantized = []
    real = module.quantize
    monkeypatch.setattr(module, "quantize", lambda *a, **k: quantized.append(a[1].name) or real(*a, **k))
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "rd"
    (out / ".frontier-scratch-999999999-x").mkdir(parents=True)  # no such pid: stale
    config = {"structures": ("lowrank",), "formats": ("int8",), "samples": 32}
    inner = []

    def second_part(label, done, total):
        scratch = sorted(p.name for p in out.glob(".frontier-scratch-*"))
        assert len(scratch) == 1 and scratch[0].startswith(f".frontier-scratch-{os.getpid()}-")
        if done == 1 and not inner:
            inner.append(frontier(ckpt, out, FrontierConfig(budgets=(0.5,), **config), plot=False))

    outer = frontier(ckpt, out, FrontierConfig(budgets=(0.25,), **config), plot=False, progress=second_part)
    labels = [p["label"] for p in outer["points"]]
    assert "lowrank 0.5 int8" in labels and "lowrank 0.25 int8" in labels
    assert sorted(labels) == sorted(p["label"] for p in inner[0]["points"] + outer["points"][-1:])
    on_disk = json.loads((out / "frontier.json").read_text())
    assert on_disk["points"] == outer["points"]
    assert [p["pareto"] for p in outer["points"]] == pareto_flags(
        [(p["bytes"], p["metric"]) for p in outer["points"]]
    )
    assert not list(out.glob(".frontier-scratch-*"))
    assert len(quantized) == len(labels) - 1  # every point but the reference, once


def test_a_point_taken_by_another_running_part_is_skipped(tmp_path):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "rd"
    out.mkdir()
    # a live process other than this one (the parent) holds the dense int8 round-to-nearest
    # point and the factorized budget; a dead one held the feedback point
    claims = {"dense int8 rtn": os.getppid(), "lowrank 0.5": os.getppid(), "dense int8 feedback": 999999999}
    (out / ".frontier-claims.json").write_text(json.dumps(claims))
    config = FrontierConfig(structures=("lowrank",), budgets=(0.5,), formats=("int8",), samples=32)
    document = frontier(ckpt, out, config, plot=False)
    assert [p["label"] for p in document["points"]] == ["dense float (reference)", "dense int8 feedback"]
    taken = json.loads((out / ".frontier-claims.json").read_text())
    assert taken == {"dense int8 rtn": os.getppid(), "lowrank 0.5": os.getppid()}  # its own released


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--min-recovery", "1.5"], "--min-recovery"),
        (["--min-recovery", "0"], "--min-recovery"),
        (["--min-recovery", "0.9", "--max-bytes", "lots"], "--max-bytes"),
        (["--max-bytes", "1MB"], "--min-recovery"),
        (["--artifact", "a"], "--min-recovery"),
    ],
)
def test_search_bad_values_exit_2(tmp_path, cli, extra, message):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    result = cli("frontier", ckpt, "-o", tmp_path / "rd", "--no-plot", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "rd").exists()


def test_factorized_folders_replace_factorizing_and_are_checked(tmp_path, cli, monkeypatch):
    import lyoncompress.frontier as module

    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    config = FrontierConfig(structures=("lowrank",), budgets=(0.5,), formats=("int8",), samples=32)
    fresh = frontier(ckpt, tmp_path / "fresh", config, plot=False)
    given = tmp_path / "fact"
    assert cli("factorize", ckpt, "-o", given, "--method", "lowrank", "--budget", "0.5", "-q").exit_code == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in given.iterdir())

    def no_factorize(*args, **kwargs):
        raise AssertionError("factorized again")

    monkeypatch.setattr(module, "factorize", no_factorize)
    reused = frontier(ckpt, tmp_path / "reused", config, plot=False, factorized=[given])
    assert [(p["label"], p["bytes"], p["params_ratio"]) for p in reused["points"]] == [
        (p["label"], p["bytes"], p["params_ratio"]) for p in fresh["points"]
    ]
    metrics = {p["label"]: p["metric"] for p in fresh["points"]}
    assert all(p["metric"] == pytest.approx(metrics[p["label"]], abs=1e-6) for p in reused["points"])
    assert sorted((p.name, p.stat().st_mtime_ns) for p in given.iterdir()) == before  # untouched
    monkeypatch.undo()
    other = tmp_path / "other"
    made = cli("factorize", ckpt, "-o", other, "--method", "lowrank", "--budget", "0.5", "--depth", "3", "-q")
    assert made.exit_code == 0, made.output
    for folder, message in [(other, "other options: depth"), (ckpt, "not a folder written by factorize")]:
        args = ["frontier", ckpt, "-o", tmp_path / "bad", "--structure", "lowrank", "--budget", "0.5"]
        result = cli(*args, "--factorized", folder, "--no-plot")
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "bad").exists()
