"""The rich tables that the command line prints, one per report (the reports are the
library verbs' return values; nothing here computes or writes)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def factorize_table(report: dict[str, Any]) -> Table:
    calibrated = any(row.get("output_error") is not None for row in report["layers"])
    table = Table(title="factorized layers", title_justify="left")
    columns = ["layer", "structure", "chain", "params", "kept", "weight error"]
    columns += ["output error (held-out)"] if calibrated else []
    for column in [*columns, "s"]:
        table.add_column(column, justify="left" if column in ("layer", "structure", "chain") else "right")
    for row in report["layers"]:
        cells = [
            row["name"],
            row["structure"],
            row["chain"],
            f"{row['params_after']:,}",
            f"{row['ratio']:.1%}",
            f"{row['rel_error']:.4f}",
        ]
        cells += [f"{row['output_error']:.4f}"] if calibrated else []
        table.add_row(*cells, f"{row['seconds']:.2f}")
    totals = report["totals"]
    table.add_section()
    blanks = [""] * (len(columns) - 5)
    table.add_row(
        f"{totals['layers']} layers",
        "",
        "",
        f"{totals['params_after']:,}",
        f"{totals['ratio']:.1%}",
        *blanks,
        f"{report['seconds']:.2f}",
    )
    return table


def search_table(found: dict[str, Any]) -> Table:
    table = Table(
        title=f"budget search: {found['task']} {found['metric']} >= {found['min_recovery']}",
        title_justify="left",
    )
    for column in ("budget", "params kept", found["metric"], "result"):
        table.add_column(column, justify="right")
    for step in sorted(found["curve"], key=lambda step: step["budget"]):
        chosen = " (chosen)" if step["budget"] == found["chosen_budget"] else ""
        table.add_row(
            f"{step['budget']:.4f}",
            f"{step['params_ratio']:.1%}",
            f"{step['metric']:.4f}",
            ("[green]pass[/]" if step["passed"] else "[red]fail[/]") + chosen,
        )
    return table


def quantize_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"quantized layers ({report['format']}, {report['rescale']})", title_justify="left")
    calibrated = report.get("calib") is not None
    columns = ["layer", "bits/weight", "error", "round-to-nearest", "ratio"]
    columns += ["output error (held-out)", "RTN output error"] if calibrated else []
    for column in columns + ["s"]:
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in report["layers"]:
        ratio = row["rel_error"] / row["rtn_rel_error"] if row["rtn_rel_error"] else float("nan")
        cells = [
            row["name"],
            f"{row['bits_per_weight']:g}",
            f"{row['rel_error']:.2e}",
            f"{row['rtn_rel_error']:.2e}",
            f"{ratio:.2f}x",
        ]
        cells += [f"{row['output_error']:.2e}", f"{row['rtn_output_error']:.2e}"] if calibrated else []
        table.add_row(*cells, f"{row['seconds']:.2f}")
    return table


def inspect_table(document: dict[str, Any]) -> Table:
    """``inspect_artifact``'s document, one row per layer and a total."""
    layers, totals = document["layers"], document["totals"]
    before, after = totals["params_before"], totals["params_after"]
    table = Table(title=document["artifact"], title_justify="left")
    quantized = any(layer["quantization_rel_error"] is not None for layer in layers)
    columns = ["layer", "structure", "chain", "params", "compression", "weight error"]
    columns += ["quantization error"] if quantized else []
    for column in [*columns, "bits", "bytes"]:
        table.add_column(column, justify="left" if column in ("layer", "structure", "chain") else "right")
    for layer in layers:
        cells = [
            layer["name"],
            layer["structure"],
            layer["chain"],
            f"{layer['params_after']:,}",
            f"{layer['compression']:.2f}x",
            _error(layer["rel_error"]),
        ]
        cells += [_error(layer["quantization_rel_error"])] if quantized else []
        table.add_row(*cells, f"{layer['bits']:g}", _size(layer["bytes"]))
    table.add_section()
    blanks = [""] * (len(columns) - 5)
    table.add_row(
        "total", "", "", f"{after:,}", f"{before / after:.2f}x", *blanks, "", _size(totals["layer_bytes"])
    )
    table.add_row("whole artifact", "", "", "", "", *blanks, "", _size(totals["artifact_bytes"]))
    return table


def _error(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def _size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


def eval_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"eval {report['artifact']} vs {report['reference']}", title_justify="left")
    for column in ("task", "metric", "value", "gate", "result"):
        table.add_column(column, justify="right" if column == "value" else "left")
    gates = {(g["task"], g["metric"]): g for g in report["gates"]}
    for task, metrics in report["tasks"].items():
        for metric, value in metrics.items():
            gate = gates.get((task, metric))
            verdict = "" if gate is None else ("[green]pass[/]" if gate["passed"] else "[bold red]FAIL[/]")
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(task, metric, shown, gate["threshold"] if gate else "", verdict)
    return table


def layer_error_table(report: dict[str, Any]) -> Table:
    table = Table(title="per layer", title_justify="left")
    columns = [
        c for c in ("rel_error", "output_error", "compression") if any(c in r for r in report["layers"])
    ]
    table.add_column("layer")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for row in report["layers"]:
        table.add_row(row["name"], *(f"{row[c]:.4f}" if c in row else "" for c in columns))
    return table


def frontier_table(document: dict[str, Any]) -> Table:
    settings = document["settings"]
    table = Table(title=f"rate-distortion ({settings['task']} {settings['metric']})", title_justify="left")
    for column in ("point", "kind", "MB", "kept", settings["metric"], "Pareto"):
        table.add_column(column, justify="left" if column in ("point", "kind") else "right")
    for p in sorted(document["points"], key=lambda p: p["bytes"]):
        kept = "" if p["params_ratio"] is None else f"{p['params_ratio']:.1%}"
        table.add_row(
            p["label"],
            p["kind"],
            f"{p['bytes'] / 1e6:.4g}",
            kept,
            f"{p['metric']:.4f}",
            "*" if p["pareto"] else "",
        )
    return table
