"""Benchmark (not a test): peak memory of ``lyoncompress factorize`` on a >= 2 GB checkpoint.

Run: ``.venv/bin/python benchmarks/memory.py`` (issue 4).

Goal: the factorize process's peak RSS stays within **4x the largest single tensor
plus the interpreter** (the footprint of a process that only imports torch and
lyoncompress), whatever the checkpoint size, because the reader, the factorizer and
the artifact writer all work one tensor at a time.

What it does:

1. Builds a synthetic float32 Hugging Face-style checkpoint in a temporary folder
   (or ``--workdir``): ``--layers`` Linear weights of ``--rows x --cols`` plus their
   biases (default 40 x 4096 x 3072 = 2.0 GB), written shard by shard with
   safetensors plus a ``model.safetensors.index.json``, so building it needs one
   shard of memory, not the whole model.
2. Runs a baseline child (``import torch, lyoncompress.cli``) and the factorize
   child (``python -m lyoncompress.cli factorize ... --method lowrank --budget 0.25
   --quiet --max-shard-size 500MB``), each reaped with ``os.wait4`` so its own peak
   RSS (``ru_maxrss``, which includes touched pages of mmapped files) is read, not
   the maximum over every child so far.
3. Prints a Markdown table and removes everything it wrote (``--keep`` keeps it).

``--compress N`` factorizes only the first N layers and streams the others through
unchanged: the full 2 GB is still read and written, but a 4096 x 3072 float64 SVD
takes ~45 s on 2 cores, so all 40 layers take ~30 min. Every factorized layer has
the same shape, so the per-layer peak is the same whichever layers are compressed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GOAL_FACTOR = 4.0
MIB = 1 << 20


@dataclass(frozen=True)
class ChildRun:
    """One reaped child: its peak RSS in bytes, wall time and exit code."""

    peak_rss: int
    seconds: float
    returncode: int
    stderr: str


def build_checkpoint(folder: Path, layers: int, rows: int, cols: int, shard_bytes: int) -> tuple[int, int]:
    """Write the synthetic checkpoint; returns (total tensor bytes, largest tensor bytes).

    Runs in its own child (``--build-only``): see ``_run`` for why the parent stays small.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weight_bytes = rows * cols * 4
    per_shard = max(1, shard_bytes // weight_bytes)
    shard_count = -(-layers // per_shard)
    weight_map: dict[str, str] = {}
    total = 0
    generator = torch.Generator().manual_seed(0)
    for shard in range(shard_count):
        name = f"model-{shard + 1:05d}-of-{shard_count:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            prefix = f"model.layers.{layer}.mlp.proj"
            # scaled like a trained Linear init so norms (and the SVD) are well-behaved
            tensors[f"{prefix}.weight"] = torch.randn(rows, cols, generator=generator) / cols**0.5
            tensors[f"{prefix}.bias"] = torch.zeros(rows)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"model_type": "synthetic-mlp", "hidden_size": cols, "num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(config))
    return total, weight_bytes


def run_child(argv: list[str]) -> ChildRun:
    """Run ``argv`` and read *its* peak RSS from ``wait4`` (RUSAGE_CHILDREN would be
    the maximum over every child reaped so far, baseline included)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return ChildRun(usage.ru_maxrss * scale, seconds, process.returncode, stderr)


def human(size: float) -> str:
    return f"{size / MIB:,.1f} MiB" if size < 10 * (1 << 30) else f"{size / (1 << 30):.2f} GiB"


def own_peak() -> int:
    """This process's peak RSS: it must stay below the baseline child's to not skew it."""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40, help="Linear layers (default 40: 2.0 GB)")
    parser.add_argument("--rows", type=int, default=4096, help="out_features of each layer")
    parser.add_argument("--cols", type=int, default=3072, help="in_features of each layer")
    parser.add_argument(
        "--compress", type=int, default=None, help="factorize only the first N layers (default: all)"
    )
    parser.add_argument("--method", default="lowrank")
    parser.add_argument("--budget", default="0.25")
    parser.add_argument("--max-shard-size", default="500MB", help="artifact shard size")
    parser.add_argument("--input-shard-mb", type=int, default=500, help="synthetic checkpoint shard size")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and artifact")
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only is not None:
        total, largest = build_checkpoint(
            args.build_only, args.layers, args.rows, args.cols, args.input_shard_mb * 1_000_000
        )
        print(json.dumps({"total": total, "largest": largest}))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="lyon-mem-", dir=args.workdir))
    try:
        return _run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path) -> int:
    checkpoint, artifact = workdir / "checkpoint", workdir / "artifact"
    free = shutil.disk_usage(workdir).free
    needed = args.layers * (args.rows * args.cols + args.rows) * 4 * 1.6  # input + artifact + slack
    if free < needed:
        print(f"not enough disk in {workdir}: {human(free)} free, ~{human(needed)} needed", file=sys.stderr)
        return 2
    print(f"building {args.layers} x {args.rows}x{args.cols} float32 in {checkpoint} ...", file=sys.stderr)
    begin = time.perf_counter()
    # Built in a child, and torch never imported here: on Linux a child's ru_maxrss
    # includes the RSS it inherited at fork, before exec, so a parent holding a
    # 500 MB shard (or torch) would inflate every child's reading.
    built = subprocess.run(
        [sys.executable, __file__, "--build-only", str(checkpoint), "--layers", str(args.layers),
         "--rows", str(args.rows), "--cols", str(args.cols), "--input-shard-mb", str(args.input_shard_mb)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    sizes = json.loads(built.stdout)
    total, largest = sizes["total"], sizes["largest"]
    print(f"built {human(total)} in {time.perf_counter() - begin:.0f} s", file=sys.stderr)

    baseline = run_child([sys.executable, "-c", "import torch, lyoncompress.cli"])
    compress = args.layers if args.compress is None else min(args.compress, args.layers)
    argv = [
        sys.executable, "-m", "lyoncompress.cli", "factorize", str(checkpoint), "-o", str(artifact),
        "--method", args.method, "--budget", args.budget, "--quiet",
        "--max-shard-size", args.max_shard_size,
    ]  # fmt: skip
    if compress < args.layers:
        argv += ["--target", rf"model\.layers\.({'|'.join(map(str, range(compress)))})\.mlp\.proj"]
    print(f"factorizing {compress} of {args.layers} layers ...", file=sys.stderr)
    run = run_child(argv)
    if run.returncode != 0:
        print(f"factorize failed (exit {run.returncode}):\n{run.stderr}", file=sys.stderr)
        return 1
    out_bytes = sum(f.stat().st_size for f in artifact.iterdir() if f.suffix == ".safetensors")

    ratio = (run.peak_rss - baseline.peak_rss) / largest
    met = ratio <= GOAL_FACTOR
    rows = [
        ("checkpoint", f"{human(total)} ({args.layers} x {args.rows}x{args.cols} float32 + biases)"),
        ("largest tensor", human(largest)),
        ("layers factorized", f"{compress} of {args.layers} ({args.method}, budget {args.budget})"),
        ("artifact", human(out_bytes)),
        ("peak RSS (factorize)", human(run.peak_rss)),
        ("parent RSS (inherited at fork)", human(own_peak())),
        ("interpreter baseline", human(baseline.peak_rss)),
        ("(peak - baseline) / largest", f"{ratio:.2f}x"),
        ("goal", f"<= {GOAL_FACTOR:g}x"),
        ("result", "met" if met else "MISSED"),
        ("wall time (factorize)", f"{run.seconds:.0f} s"),
    ]
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}\n")
    print("| metric | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    return 0  # a benchmark, not a gate: the table says met or MISSED


if __name__ == "__main__":
    sys.exit(main())
