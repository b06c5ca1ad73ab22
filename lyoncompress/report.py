"""Reports kept beside an artifact: adding a section to ``report.json``, plotting errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lyoncompress.errors import InputError


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


def plot_layer_errors(report: dict[str, Any], path: str | Path) -> None:
    """Write a PNG of each layer's error against its compression ratio.

    Args:
        report: an ``evaluate`` report (its ``layers`` rows).
        path: the PNG to write.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise InputError("--plot needs matplotlib: pip install 'lyoncompress[plot]'") from err
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
