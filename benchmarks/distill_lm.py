"""Distillation of a causal LM's compressed layers, judged by held-out perplexity along
the way (issue 16: SmolLM2-135M, all MLP matrices at 50%, target <= 1.5x dense).

The start is an artifact ``factorize`` wrote, e.g.
``factorize /work/cache/smollm2 -o START --calib builtin --method lowrank --target
're:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj'``. It is loaded and distilled with
the shipped ``distill`` (the model's default objective, ``logits-kl``; best held-out
state kept) on the split ``factorize --distill-steps`` uses (``data.distill_split`` of the
calibration batches: the first 16 every-4th batches judge, every other batch trains,
regrouped by length), so a run here is ``factorize ... --distill-steps N --distill-lr LR``
without the layer-wise fit (read from disk instead of recomputed).

Perplexity is ``eval --task perplexity``'s (``tasks.text_perplexity``: token-weighted,
one text at a time) on the built-in ``eval`` text, disjoint from the ``calib`` text that
calibration and distillation use. The dense model's and the start's are measured in the
same process; at each ``--at`` step the current state's, and at the end the kept (best
held-out) state's, which is what ``factorize`` would write.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distill_lm.py \\
        --checkpoint /work/cache/smollm2 --start START --steps 300 --lr 3e-4 \\
        --schedule warmup-cosine --at 100 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lyoncompress.checkpoint import open_checkpoint
from lyoncompress.data import builtin_corpus, calibration_batches, distill_split, load_tokenizer
from lyoncompress.evaluation.tasks import text_perplexity
from lyoncompress.models import load_compressed, load_reference
from lyoncompress.recipe import DEFAULT_CALIB_SAMPLES
from lyoncompress.refine.distill import SCHEDULES, distill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the dense HF folder")
    parser.add_argument("--start", type=Path, required=True, help="artifact folder factorize wrote")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="peak Adam step (default: the objective's)")
    parser.add_argument("--schedule", choices=tuple(SCHEDULES), default=None, help="default: the objective's")
    parser.add_argument("--at", type=int, nargs="*", default=(), help="steps at which to measure perplexity")
    parser.add_argument("--samples", type=int, default=256, help="held-out eval sentences")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="held-out check interval (default: distill's, steps // 10)",
    )
    parser.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES)
    args = parser.parse_args()
    if not (args.start / "report.json").is_file():
        parser.error(f"--start {args.start}: not an artifact folder factorize wrote")
    if args.steps < 1 or (args.lr is not None and not args.lr > 0):
        parser.error("--steps must be >= 1 and --lr > 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(args.checkpoint)
    texts = builtin_corpus(args.samples, 0, split="eval")
    reference = load_reference(args.checkpoint)
    model = load_compressed(args.start)
    config = open_checkpoint(args.checkpoint).config or {}
    train, val = distill_split(
        list(calibration_batches(args.checkpoint, config, "builtin", args.calib_samples))
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; {len(train)} training / {len(val)} held-out batches; "
        f"{len(texts)} eval sentences; start {args.start}",
        flush=True,
    )
    dense = text_perplexity(reference, tokenizer, texts)
    start = text_perplexity(model, tokenizer, texts)
    print(f"dense perplexity {dense:.2f}; start {start:.2f} ({start / dense:.3f}x)", flush=True)
    rows: list[tuple[str, float, float, float]] = []  # (state, perplexity, seconds, load)
    started = time.perf_counter()
    measuring = 0.0

    def progress(done: int, total: int, best: float) -> None:
        nonlocal measuring
        if done % 10 == 0:
            print(f"  step {done}/{total}: {time.perf_counter() - started - measuring:.0f} s", flush=True)
        if done in args.at and done < total:
            t = time.perf_counter()
            ppl = text_perplexity(model, tokenizer, texts)
            measuring += time.perf_counter() - t
            rows.append((f"step {done} (current state)", ppl, t - started - measuring, os.getloadavg()[0]))
            print(
                f"  step {done}: perplexity {ppl:.2f} ({ppl / dense:.3f}x), best held-out {best:.4f}",
                flush=True,
            )

    result = distill(
        reference,
        model,
        train,
        val,
        args.steps,
        args.lr,
        args.eval_every,
        progress=progress,
        schedule=args.schedule,
    )
    seconds = time.perf_counter() - started - measuring
    final = text_perplexity(model, tokenizer, texts)
    rows.append((f"end: best held-out state of {args.steps} steps", final, seconds, os.getloadavg()[0]))
    print(
        f"\n{result.objective}, {args.steps} steps, lr {result.lr:g}, schedule {result.schedule}; "
        f"held-out {result.objective} {result.val_before:.4f} -> {result.val_after:.4f}"
    )
    print("held-out checks (steps, value): " + json.dumps([[s, round(v, 4)] for s, v in result.history]))
    print("\n| state | perplexity | ratio to dense | distill s (excl. perplexity) | load |")
    print("|---|---|---|---|---|")
    print(f"| dense | {dense:.2f} | 1.000x | - | - |")
    print(f"| start | {start:.2f} | {start / dense:.3f}x | 0 | - |")
    for name, ppl, secs, load in rows:
        print(f"| {name} | {ppl:.2f} | {ppl / dense:.3f}x | {secs:.0f} | {load:.1f} |")


if __name__ == "__main__":
    main()
