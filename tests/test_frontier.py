"""frontier: bytes of the written artifacts, Pareto marking, the CLI."""

import json
import math
import random

import pytest
from safetensors import safe_open

from lyoncompress.frontier import FrontierConfig, Point, file_bytes, pareto_flags, tensor_bytes, verdict
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
    assert not (root / "rd" / ".frontier-scratch").exists()


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
