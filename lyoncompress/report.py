"""Reports kept beside an artifact: adding a section to ``report.json``, plotting errors,
and the time and memory of each phase of a run (``Phases``)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lyoncompress.errors import InputError


class Phases:
    """The seconds of each phase of a run and the process's peak memory when it ended.

    ``peak_rss_mb`` is ``getrusage``'s high-water mark of the process so far (it never
    goes down: the phase where it grows is the one that needed the memory);
    ``peak_cuda_mb`` is torch's peak of allocated CUDA memory so far, when CUDA is in use.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._begin = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        row: dict[str, Any] = {"phase": phase, "seconds": round(now - self._begin, 3)}
        row["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
        if torch.cuda.is_initialized():
            row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.rows.append(row)
        self._begin = now


def peak_rss_bytes() -> int:
    """The process's peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def add_to_report(artifact: str | Path, key: str, document: dict[str, Any]) -> Path:
    """Store ``document`` under ``key`` in the artifact's ``report.json``, atomically.

    Args:
        artifact: artifact folder; a missing ``report.json`` is created.
        key: the section, e.g. ``"eval"``; an existing one is replaced.
        document: JSON-serializable (other values are written as ``str``).

    Returns:
        The path of ``report.json``.

    Example:
        >>> add_to_report("fact/", "eval", evaluate("fact/", "model/"))
        PosixPath('fact/report.json')
    """
    path = Path(artifact) / "report.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report[key] = document
    staging = path.with_name(f".report.json.tmp-{os.getpid()}")
    staging.write_text(json.dumps(report, indent=2, default=str) + "\n")
    staging.replace(path)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise InputError("--plot needs matplotlib: pip install 'lyoncompress[plot]'") from err
    return plt


def plot_layer_errors(report: dict[str, Any], path: str | Path) -> None:
    """Write a PNG of each layer's error against its compression ratio.

    Args:
        report: an ``evaluate`` report (its ``layers`` rows).
        path: the PNG to write.
    """
    plt = _pyplot()
    rows = [r for r in report["layers"] if "compression" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, marker in (("rel_error", "o"), ("output_error", "s")):
        points = [(r["compression"], r[key]) for r in rows if key in r]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=key.replace("_", " "))
    ax.set_xlabel("compression ratio (dense params / stored params)")
    ax.set_ylabel("relative error")
    ax.set_title("per-layer error vs compression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_FORMAT_MARKERS = {"fp16": "o", "bf16": "o", "int8": "s", "int4": "^"}


def plot_frontier(document: dict[str, Any], path: str | Path) -> None:
    """Write a PNG of a ``frontier`` report: metric against whole-artifact megabytes, one
    colour per structure, dense-quantized baselines as black stars (labelled), the
    Pareto-optimal points ringed and joined.

    Args:
        document: the report ``frontier`` returns.
        path: the PNG to write.
    """
    plt = _pyplot()
    points = document["points"]
    fig, ax = plt.subplots(figsize=(8, 5))
    structures = sorted({p["structure"] for p in points if p["kind"] == "factorized"})
    colours = plt.get_cmap("tab10")
    for index, structure in enumerate(structures):
        for fmt, marker in _FORMAT_MARKERS.items():
            chosen = [p for p in points if p["structure"] == structure and p["format"] == fmt]
            if chosen:
                xs, ys = [p["bytes"] / 1e6 for p in chosen], [p["metric"] for p in chosen]
                ax.scatter(xs, ys, color=colours(index), marker=marker, label=f"{structure} {fmt}")
    for p in (p for p in points if p["kind"] != "factorized"):
        ax.scatter(p["bytes"] / 1e6, p["metric"], color="black", marker="*", s=90)
        ax.annotate(p["label"], (p["bytes"] / 1e6, p["metric"]), fontsize=7, xytext=(4, -8),
                    textcoords="offset points")  # fmt: skip
    front = sorted((p["bytes"] / 1e6, p["metric"]) for p in points if p["pareto"])
    if front:
        ax.plot(*zip(*front), color="grey", linewidth=1, drawstyle="steps-post", zorder=0)
        ax.scatter(*zip(*front), facecolors="none", edgecolors="red", s=160, label="Pareto-optimal")
    settings = document["settings"]
    ax.set_xscale("log")
    ax.set_xlabel("whole-artifact tensor bytes (MB, log scale)")
    ax.set_ylabel(f"{settings['task']} {settings['metric']} (held out)")
    ax.set_title("rate-distortion: dense-quantized (stars) vs factorized + quantized")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
