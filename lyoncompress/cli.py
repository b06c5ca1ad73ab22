"""The ``lyoncompress`` command line: thin typer wrappers over the library verbs.

Tables and progress go to stderr; ``--json`` prints one document on stdout.
Exit codes: 0 ok, 1 an accuracy gate failed, 2 usage or bad input, 3 internal error.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from lyoncompress import tables
from lyoncompress.distributed import PeerFailed, launched_ranks
from lyoncompress.errors import InputError, LyoncompressError
from lyoncompress.evaluation import evaluate as evaluate_artifact
from lyoncompress.factorization.budget_search import SearchStep, gated_metric, search_budget
from lyoncompress.factorization.pipeline import factorize as factorize_checkpoint
from lyoncompress.frontier import FrontierConfig, FrontierSearch
from lyoncompress.frontier import frontier as measure_frontier
from lyoncompress.inspection import inspect_artifact
from lyoncompress.quantization.pipeline import quantize as quantize_artifact
from lyoncompress.recipe import (
    DEFAULT_CALIB_SAMPLES,
    DEFAULT_EVAL_SAMPLES,
    Recipe,
    RecipeFile,
    SearchConfig,
    load_recipe,
)
from lyoncompress.report import add_to_report, plot_layer_errors

EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3

app = typer.Typer(
    help=(
        "Compress trained networks with butterfly (Kronecker-sparse) factors.\n\n"
        "Example:  lyoncompress factorize model.safetensors -o fact/ && lyoncompress inspect fact/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
# an option whose default comes from the recipe is None in typer; its help shows the default
_DEFAULT = "[dim]\\[default: {}][/dim]"
RecipeOption = Annotated[
    Path | None,
    typer.Option(
        help="YAML recipe (configs/*.yaml; flat, or with factorize/quantize/eval/search sections); flags win."
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """User mistakes -> one line and exit 2; bugs -> traceback and exit 3."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except PeerFailed as err:
            # another rank of a torchrun run failed and printed its traceback, if any; rank 0
            # says which rank and why, once
            if launched_ranks().leader:
                err_console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL if err.internal else EXIT_BAD_INPUT) from None
        except LyoncompressError as err:
            # Text, not markup: messages quote user input and extras like [plot]. Under
            # torchrun rank 0 prints every rank's bad input (as "rank N: ...")
            if launched_ranks().leader:
                err_console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            err_console.print(
                "[bold red]interrupted[/]: nothing was written "
                "(factorize: rerun with --resume to keep its finished layers)"
            )
            raise typer.Exit(130) from None
        except Exception:
            err_console.print("[bold red]internal error[/] (please report it):")
            err_console.print(traceback.format_exc(), highlight=False, markup=False)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _show_progress(quiet: bool, as_json: bool) -> bool:
    return not (quiet or as_json or os.environ.get("CI", "").lower() in ("1", "true"))


class _LayerProgress:
    """A rich progress bar over layers, on stderr; a no-op when disabled."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.progress = (
            Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            if enabled
            else None
        )
        self.task = None
        self.done, self.total = 0, 0

    def __enter__(self) -> _LayerProgress:
        if self.progress:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.__exit__(*exc)

    def __call__(self, name: str, done: int, total: int) -> None:
        if not self.progress:
            return
        if self.task is None:
            self.task = self.progress.add_task(name, total=total)
        # one bar serves several phases (permutation search, layers, distillation steps):
        # a new phase starts the count, and the speed behind the ETA, again
        if done < self.done or total != self.total:
            self.progress.reset(self.task, total=total)
        self.done, self.total = done, total
        self.progress.update(self.task, completed=done, total=total, description=name)


def _print_warnings(report: dict[str, Any]) -> None:
    for warning in report["warnings"]:
        err_console.print(Text.assemble(("warning: ", "yellow"), warning))


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _print_factorized(report: dict[str, Any]) -> None:
    err_console.print(tables.factorize_table(report))
    _print_distilled(report)


def _print_distilled(report: dict[str, Any]) -> None:
    if "distill" in report:
        d = report["distill"]
        if "select" in d:
            picked = d["select"]
            for row in picked["tried"]:
                mark = "  <- chosen" if row["candidate"] == picked["chosen"] else ""
                err_console.print(
                    f"start {row['candidate']} ({', '.join(f'{k} x{n}' for k, n in row['fits'].items())}): "
                    f"held-out {row['val_output_error_before']:.4f} -> {row['val_output_error_after']:.4f} "
                    f"after {picked['steps']} steps{mark}"
                )
        err_console.print(
            f"distillation ({d['steps']} steps, lr {d['lr']:g}"
            f"{', ' + d['schedule'] if 'schedule' in d else ''}): held-out {d['objective']} "
            f"{d['val_output_error_before']:.4f} -> {d['val_output_error_after']:.4f}"
        )


def _recipe_file(recipe_path: Path | None) -> RecipeFile:
    return load_recipe(recipe_path) if recipe_path else RecipeFile()


@app.command()
@_reports_errors
def factorize(
    checkpoint: Annotated[
        Path, typer.Argument(help=".safetensors file, HF model folder, or .bin/.pt state dict.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to create.")],
    recipe: RecipeOption = None,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Regex (re.fullmatch) of module names to compress; repeatable."),
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option(help="Regex of module names to keep dense; repeatable.")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="auto | butterfly | monarch | lowrank | hybrid (with or without --calib)."),
    ] = None,
    depth: Annotated[int | None, typer.Option(help="Factors per butterfly chain.")] = None,
    budget: Annotated[float | None, typer.Option(help="Fraction of each layer's parameters to keep.")] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration data: 'builtin' (offline: the digits for the demo MLP, ~12k standard-library "
            "docstring sentences for text models, none used by eval) or a file; picks structures by "
            "output error."
        ),
    ] = None,
    calib_samples: Annotated[
        int | None,
        typer.Option(help=f"Input rows per layer to capture, per split [{DEFAULT_CALIB_SAMPLES}]."),
    ] = None,
    refine_steps: Annotated[int | None, typer.Option(help="Adam steps of each layer's refinement.")] = None,
    refine_sweeps: Annotated[
        int | None, typer.Option(help="Alternating least-squares sweeps of each layer's refinement.")
    ] = None,
    distill_steps: Annotated[
        int | None, typer.Option(help="Adam steps of end-to-end distillation of all factors (needs --calib).")
    ] = None,
    distill_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of the distillation [2e-4 decayed to 0 for encoders' layers-mse; "
            "1e-4 for causal LMs' logits-kl; 5e-5 otherwise]."
        ),
    ] = None,
    distill_objective: Annotated[
        str | None,
        typer.Option(
            help="What the distillation matches: layers-mse (every layer's hidden states), layers-embedding "
            "(those plus the pooled sentence embedding's cosine), hidden-mse (final outputs) or logits-kl "
            "(causal LMs' next-token distributions) [layers-mse for encoders, logits-kl for causal LMs, "
            "hidden-mse otherwise]."
        ),
    ] = None,
    distill_batch: Annotated[
        int | None,
        typer.Option(
            help="Sentences per distillation step for text models, the training text regrouped by "
            "length [0: the calibration batch, 16]."
        ),
    ] = None,
    distill_select_steps: Annotated[
        int | None,
        typer.Option(
            help="Pick the distillation's start by a short distillation of this many steps from each "
            "whole-model candidate (the layer-wise choice; every layer's best low rank, Monarch, hybrid), "
            "scored on the calibration data's held-out batches (needs --distill-steps, method auto)."
        ),
    ] = None,
    sequential: Annotated[
        bool | None,
        typer.Option(
            "--sequential/--no-sequential",
            help="Fit layers in forward order on the inputs of the already-compressed model (needs --calib).",
        ),
    ] = None,
    permute: Annotated[
        bool | None,
        typer.Option(
            "--permute/--no-permute",
            help="Reorder the hidden units of MLP pairs so both matrices fit their structure better "
            "(function unchanged; folded into the weights).",
        ),
    ] = None,
    allocate: Annotated[
        str | None,
        typer.Option(
            help="uniform: every layer keeps --budget | sensitivity: the same total, more where the "
            "final output is hurt more (needs --calib)."
        ),
    ] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="Largest shard, e.g. 5GB.")] = None,
    min_recovery: Annotated[
        float | None,
        typer.Option(
            help="Search the smallest global budget whose model reaches this recovery (0 < F <= 1) "
            "on --eval-task, by bisection; exit 1, writing nothing, if --max-budget misses it.",
            rich_help_panel="Budget search",
        ),
    ] = None,
    eval_task: Annotated[
        str | None,
        typer.Option(
            help="Task gated by --min-recovery: classification (accuracy ratio) | embeddings (cosine) | "
            "perplexity (ratio) | outputs (final cosine); default: the model kind's recovery task.",
            rich_help_panel="Budget search",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            help="Evaluation data, as eval --data (default: built-in).", rich_help_panel="Budget search"
        ),
    ] = None,
    min_budget: Annotated[
        float | None, typer.Option(help="Smallest budget tried [0.02].", rich_help_panel="Budget search")
    ] = None,
    max_budget: Annotated[
        float | None,
        typer.Option(help="Largest budget tried, first [0.95].", rich_help_panel="Budget search"),
    ] = None,
    search_tolerance: Annotated[
        float | None,
        typer.Option(
            help="Stop when pass and fail budgets are this close [0.01].", rich_help_panel="Budget search"
        ),
    ] = None,
    search_steps: Annotated[
        int | None,
        typer.Option(
            help="Most factorize+eval rounds, bounds included [12].", rich_help_panel="Budget search"
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto | cpu | cuda: where the calibrated steps run (auto: cuda if available)."),
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option(
            help="auto | on | off: calibrate block by block, the model never whole in memory (auto: for "
            "model.layers / encoder.layer models, unless sensitivity allocation or end-to-end "
            "distillation needs the whole model; on: distillation becomes block-wise)."
        ),
    ] = None,
    max_bytes: Annotated[
        str | None,
        typer.Option(
            help="Refuse (exit 1, nothing written) when the smallest passing budget's artifact holds "
            "more tensor bytes than this, e.g. 40MB.",
            rich_help_panel="Budget search",
        ),
    ] = None,
    force: ForceOption = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its journal (.OUT.journal, same recipe and checkpoint).",
        ),
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Factorize the chosen layers of CHECKPOINT into butterfly factors, written to OUT.

    Example:  lyoncompress factorize model.safetensors -o fact/ --method monarch --budget 0.25

    After a crash or Ctrl-C:  lyoncompress factorize model.safetensors -o fact/ ... --resume

    Budget search:  lyoncompress factorize model/ -o fact/ --method lowrank --min-recovery 0.99
    """
    sections = _recipe_file(recipe)
    search = _budget_search(
        sections.search,
        budget,
        min_recovery,
        eval_task=eval_task,
        eval_data=eval_data,
        min_budget=min_budget,
        max_budget=max_budget,
        search_tolerance=search_tolerance,
        search_steps=search_steps,
        max_bytes=max_bytes,
    )
    options = sections.factorize.replace(
        targets=tuple(target or ()),
        ignore=tuple(ignore or ()),
        method=method,
        depth=depth,
        budget=budget,
        calib=calib,
        calib_samples=calib_samples,
        refine_steps=refine_steps,
        refine_sweeps=refine_sweeps,
        distill_steps=distill_steps,
        distill_lr=distill_lr,
        distill_objective=distill_objective,
        distill_batch=distill_batch,
        distill_select_steps=distill_select_steps,
        sequential=sequential,
        permute=permute,
        allocate=allocate,
        max_shard_size=max_shard_size,
        device=device,
        stream=stream,
    )
    if search is not None:
        if resume:
            raise InputError("--resume continues one factorize run; the budget search has none to continue")
        if launched_ranks().world > 1:
            raise InputError(
                "the budget search (--min-recovery) runs in one process; run it without torchrun"
            )
        _factorize_searching(checkpoint, out, options, search, force, as_json, quiet)
        return
    leader = launched_ranks().leader  # under torchrun only rank 0 shows progress and the summary
    with _LayerProgress(leader and _show_progress(quiet, as_json), "factorizing") as progress:
        report = factorize_checkpoint(checkpoint, out, options, force=force, progress=progress, resume=resume)
    if not leader:
        return
    _print_warnings(report)
    if as_json:
        _print_json(report)
    else:
        _print_factorized(report)
        err_console.print(f"wrote {out}")


def _budget_search(
    recipe: SearchConfig | None, budget: float | None, min_recovery: float | None, **given: Any
) -> SearchConfig | None:
    """The search options (the recipe's search section, flags win), or None without
    --min-recovery or a search section; conflicting flags exit 2."""
    flags = {name: value for name, value in given.items() if value is not None}
    if min_recovery is None and (recipe is None or (budget is not None and not flags)):
        # no search asked for, or a --budget flag wins over the recipe's search section
        if flags:
            names = ", ".join("--" + name.replace("_", "-") for name in flags)
            raise InputError(f"{names}: only used by the budget search; add --min-recovery F")
        return None
    if budget is not None:
        raise InputError("--budget and --min-recovery conflict: the search chooses the budget; drop one")
    fields = {
        "eval_task": "task",
        "eval_data": "data",
        "min_budget": "low",
        "max_budget": "high",
        "search_tolerance": "tolerance",
        "search_steps": "max_steps",
        "max_bytes": "max_bytes",
    }
    options = {fields[name]: value for name, value in flags.items()}
    if recipe is None:
        return SearchConfig(min_recovery, **options)
    return recipe.replace(min_recovery=min_recovery, **options)


def _factorize_searching(
    checkpoint: Path,
    out: Path,
    options: Recipe,
    search: SearchConfig,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    show = _show_progress(quiet, as_json)
    task, metric = gated_metric(checkpoint, search)

    def step_line(step: SearchStep, done: int, most: int) -> None:
        if show:
            verdict = "[green]pass[/]" if step.passed else "[red]fail[/]"
            err_console.print(
                f"search {done}/{most}: budget {step.budget:.4f}, kept {step.params_ratio:.1%}, "
                f"{task} {metric} {step.metric:.4f} {verdict}"
            )

    report = search_budget(checkpoint, out, search, options, force=force, progress=step_line)
    _print_warnings(report)
    found = report["budget_search"]
    if as_json:
        _print_json(report)
    else:
        if found["passed"]:
            _print_factorized(report)
        err_console.print(tables.search_table(found))
    target = f"{found['task']} {found['metric']} >= {found['min_recovery']}"
    if found.get("too_large_budget") is not None:
        err_console.print(
            Text.assemble(
                ("gate failed: ", "bold red"),
                f"the smallest budget reaching {target}, {found['too_large_budget']}, writes "
                f"{found['smallest_passing_bytes']:,} tensor bytes, over --max-bytes "
                f"{found['max_bytes']:,}; nothing written to {out}",
            )
        )
        raise typer.Exit(EXIT_GATE_FAILED)
    if not found["passed"]:
        best = max(found["curve"], key=lambda step: step["metric"])
        err_console.print(
            Text.assemble(
                ("gate failed: ", "bold red"),
                f"no budget up to {found['high']} reaches {target} (best {best['metric']:.4f} "
                f"at budget {best['budget']}); nothing written to {out}",
            )
        )
        raise typer.Exit(EXIT_GATE_FAILED)
    if not as_json:
        err_console.print(
            f"smallest passing budget {found['chosen_budget']} ({target}); wrote {out}"
            + ("" if found["converged"] else f" [yellow](not converged in {found['max_steps']} steps)[/]")
        )


@app.command()
@_reports_errors
def quantize(
    artifact: Annotated[
        Path, typer.Argument(help="Artifact written by factorize (or a checkpoint with --dense).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Quantized artifact folder to create.")],
    recipe: RecipeOption = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="int8 | int4 | fp8-e4m3 | fp8-e5m2 | bf16 | fp16 | float:tN (N = 1..24). "
            + _DEFAULT.format("int8"),
            show_default=False,
        ),
    ] = None,
    rescale: Annotated[
        str | None,
        typer.Option(
            help="none | optimal | pairwise | left-to-right | descent | feedback | auto | learned, "
            "optionally after equalize+ (default: left-to-right; for int formats equalize+auto, or "
            "auto with --calib). descent: left-to-right, then exact per-level re-solves (float "
            "formats on square butterflies; 3-5x slower). feedback: least-squares re-fit of "
            "each next factor + GPTQ rounding + clipping search; auto: the best of left-to-right, "
            "feedback and plain rounding (on held-out inputs with --calib)."
        ),
    ] = None,
    group_size: Annotated[int | None, typer.Option(help="Entries per scale along a block row.")] = None,
    dense: Annotated[
        bool, typer.Option("--dense", help="Quantize plain weights of a non-factorized model.")
    ] = False,
    include_dense: Annotated[
        list[str] | None,
        typer.Option(
            help="Regex (re.fullmatch, optional re: prefix) of module names whose plain 2-D weights "
            "are quantized too: Linear layers left dense and embedding tables; 're:.*' = every "
            "weight; repeatable."
        ),
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            help="Calibration data ('builtin' or a file as eval --data takes): the rescaling minimises "
            "each layer's output error on its inputs; the report adds held-out output errors."
        ),
    ] = None,
    calib_samples: Annotated[
        int | None,
        typer.Option(
            help="Input rows per layer to fit on (as many are held out). "
            + _DEFAULT.format(DEFAULT_CALIB_SAMPLES),
            show_default=False,
        ),
    ] = None,
    distill_steps: Annotated[
        int | None,
        typer.Option(
            help="Adam steps of quantization-aware distillation after the analytic quantization: "
            "weights and scales trained through the quantizer (straight-through rounding, LSQ "
            "scales) against --reference's outputs; int8/int4, needs --calib."
        ),
    ] = None,
    distill_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of the distillation [as factorize's: 2e-4 decayed to 0 for encoders' "
            "layers-mse; 1e-4 for causal LMs' logits-kl; 5e-5 otherwise]."
        ),
    ] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="Largest shard, e.g. 5GB.")] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the tokenizer for text --calib data (default: ARTIFACT); with "
            "--distill-steps also the dense teacher (default: ARTIFACT's float model)."
        ),
    ] = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Quantize the factors of ARTIFACT with optimal rescalings; RTN is measured beside it.

    Example:  lyoncompress quantize fact/ -o q/ --format int4 --calib builtin

    Quantization-aware distillation:  lyoncompress quantize fact/ -o q/ --format int4 --group-size 64
    --calib builtin --distill-steps 300 --reference dense/

    With a recipe:  lyoncompress quantize fact/ -o q/ --recipe recipe.yaml  (its quantize section)

    Every weight, embeddings included:  lyoncompress quantize fact/ -o q/ --include-dense 're:.*'
    """
    options = _recipe_file(recipe).quantize.replace(
        format=format,
        rescale=rescale,
        group_size=group_size,
        dense=dense or None,
        include_dense=tuple(include_dense or ()),
        calib=calib,
        calib_samples=calib_samples,
        distill_steps=distill_steps,
        distill_lr=distill_lr,
        max_shard_size=max_shard_size,
    )
    with _LayerProgress(_show_progress(quiet, as_json), "quantizing") as progress:
        report = quantize_artifact(
            artifact, out, options, reference=reference, force=force, progress=progress
        )
    _print_warnings(report)
    if as_json:
        _print_json(report)
    else:
        err_console.print(tables.quantize_table(report))
        _print_distilled(report)
        err_console.print(f"wrote {out}")


@app.command()
@_reports_errors
def frontier(
    checkpoint: Annotated[Path, typer.Argument(help="Runnable model folder (config.json with model_type).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for frontier.json/.png; points there are reused, and parts run at the "
            "same time into it split the sweep.",
        ),
    ],
    recipe: RecipeOption = None,
    task: Annotated[
        str | None, typer.Option(help="Gated task: classification | embeddings | perplexity | outputs.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Held-out evaluation data, as eval --data (default: built-in).")
    ] = None,
    samples: Annotated[
        int, typer.Option(help="Samples drawn (seeded) from the data.")
    ] = DEFAULT_EVAL_SAMPLES,
    calib: Annotated[
        str | None, typer.Option(help="Calibration data of every factorize (as factorize).")
    ] = None,
    calib_samples: Annotated[int | None, typer.Option(help="Input rows per layer to capture.")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Regex of module names to factorize.")] = None,
    refine_steps: Annotated[int | None, typer.Option(help="Adam steps of each layer's refinement.")] = None,
    structure: Annotated[
        list[str] | None,
        typer.Option(help="Structure to factorize with; repeatable [lowrank monarch butterfly]."),
    ] = None,
    budget: Annotated[
        list[float] | None, typer.Option(help="Global budget; repeatable [0.25 0.5 0.75].")
    ] = None,
    format: Annotated[
        list[str] | None, typer.Option("--format", help="Storage format; repeatable [fp16 int8 int4].")
    ] = None,
    group_size: Annotated[int, typer.Option(help="int4 entries per scale of the dense baselines.")] = 64,
    include_dense: Annotated[
        list[str] | None, typer.Option(help="Plain weights quantized with every point ['re:.*': all].")
    ] = None,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Draw frontier.png (plot extra).")] = True,
    factorized: Annotated[
        list[Path] | None,
        typer.Option(
            help="A factorize output of CHECKPOINT with these options, used for the points of its "
            "structure and budget instead of factorizing again; repeatable."
        ),
    ] = None,
    min_recovery: Annotated[
        float | None,
        typer.Option(
            help="Search over formats: pick the smallest measured artifact whose metric is >= this "
            "(exit 1 if none).",
            rich_help_panel="Search over formats",
        ),
    ] = None,
    max_bytes: Annotated[
        str | None,
        typer.Option(
            help="With --min-recovery: the chosen artifact's tensor bytes must not exceed this, e.g. 20MB.",
            rich_help_panel="Search over formats",
        ),
    ] = None,
    artifact: Annotated[
        Path | None,
        typer.Option(
            help="With --min-recovery: write the chosen artifact to this new folder.",
            rich_help_panel="Search over formats",
        ),
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Measure the gated metric against whole-artifact bytes: dense-quantized baselines
    (round-to-nearest and feedback) and factorized budgets x formats; Pareto points marked.
    With --min-recovery, pick budget, format and structure (or a dense-quantized point) giving
    the smallest passing artifact, and write it with --artifact.

    Example:  lyoncompress frontier model/ -o rd/ --calib builtin --task embeddings --budget 0.5
    """
    if min_recovery is None and (max_bytes is not None or artifact is not None):
        flag = "--max-bytes" if max_bytes is not None else "--artifact"
        raise InputError(f"{flag}: only used by the search over formats; add --min-recovery F")
    search = None if min_recovery is None else FrontierSearch(min_recovery, max_bytes)
    given = {
        "task": task,
        "data": data,
        "samples": samples,
        "group_size": group_size,
        "structures": tuple(structure or ()),
        "budgets": tuple(budget or ()),
        "formats": tuple(format or ()),
        "include_dense": tuple(include_dense or ()),
    }
    config = FrontierConfig(**{k: v for k, v in given.items() if v != ()})
    options = _recipe_file(recipe).factorize.replace(
        calib=calib, calib_samples=calib_samples, targets=tuple(target or ()), refine_steps=refine_steps
    )
    with _LayerProgress(_show_progress(quiet, as_json), "measuring") as progress:
        document = measure_frontier(
            checkpoint,
            out,
            config,
            options,
            plot=plot,
            progress=progress,
            search=search,
            artifact=artifact,
            factorized=tuple(factorized or ()),
        )
    if as_json:
        _print_json(document)
    else:
        err_console.print(tables.frontier_table(document))
        wins = document["verdict"]["factorized_wins"]
        err_console.print(
            f"factorized points strictly better than every dense-quantized point as large or larger: "
            f"{', '.join(wins) if wins else 'none'}; wrote {out / 'frontier.json'}"
        )
    if search is not None:
        _print_choice(document["search"], document["settings"], checkpoint)


def _print_choice(found: dict[str, Any], settings: dict[str, Any], checkpoint: Path) -> None:
    """The search's answer in words; exit 1 when no measured point passes (or fits)."""
    target = f"{settings['task']} {settings['metric']} >= {found['min_recovery']}"
    if not found["passed"]:
        if found["too_large"]:
            why = (
                f"the smallest point reaching {target} holds {found['smallest_passing_bytes']:,} tensor "
                f"bytes, over --max-bytes {found['max_bytes']:,}"
            )
        else:
            why = f"no measured point reaches {target} (the float checkpoint is the only one)"
        err_console.print(Text.assemble(("gate failed: ", "bold red"), f"{why}; no artifact written"))
        raise typer.Exit(EXIT_GATE_FAILED)
    what = (
        "a dense-quantized point: factorizing did not pay at this gate"
        if found["dense_won"]
        else f"factorized ({found['structure']} at budget {found['budget']:g}, then {found['format']})"
    )
    err_console.print(
        f"smallest passing artifact ({target}): {found['chosen']}, {found['bytes']:,} tensor bytes, "
        f"{settings['metric']} {found['metric']:.4f}; {what}"
    )
    if found["artifact"] is None:
        include = " ".join(f"--include-dense '{p}'" for p in settings["include_dense"])
        if found["dense_won"]:
            group = f" --group-size {found['group_size']}" if found["group_size"] else ""
            build = (
                f"lyoncompress quantize {checkpoint} -o q/ --dense --format {found['format']} "
                f"--rescale {found['rescale']}{group} {include}"
            )
        else:
            build = (
                f"lyoncompress factorize {checkpoint} -o f/ --method {found['structure']} --budget "
                f"{found['budget']:g} (the frontier's factorize options), then lyoncompress quantize f/ "
                f"-o q/ --format {found['format']} {include}"
            )
        err_console.print(f"to build it: --artifact DIR, or {build}")
        return
    again = " (rebuilt and evaluated again)" if found["rebuilt"] else ""
    err_console.print(
        f"wrote {found['artifact']}{again}: {found['artifact_bytes']:,} tensor bytes, "
        f"{settings['metric']} {found['artifact_metric']:.4f}"
    )
    if not found["artifact_passed"]:
        failed = Text.assemble(("gate failed: ", "bold red"), "the rebuilt artifact misses the gate")
        err_console.print(failed)
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
@_reports_errors
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by factorize or quantize.")],
    as_json: JsonOption = False,
) -> None:
    """Show each compressed layer: structure, chain, parameters, error and bits.

    Example:  lyoncompress inspect fact/ --json
    """
    document = inspect_artifact(artifact)
    if as_json:
        _print_json(document)
        return
    err_console.print(tables.inspect_table(document))


@app.command(name="eval")
@_reports_errors
def eval_(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (factorized or quantized).")],
    reference: Annotated[Path, typer.Option(help="The original checkpoint (HF folder to run the model).")],
    recipe: RecipeOption = None,
    task: Annotated[
        list[str] | None,
        typer.Option(help="weights | outputs | classification | embeddings | perplexity; repeatable."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Text (.txt), .npy, .npz (x, y) or .safetensors inputs.")
    ] = None,
    min_recovery: Annotated[float | None, typer.Option(help="Gate: recovery must be >= this.")] = None,
    max_output_error: Annotated[float | None, typer.Option(help="Gate: final output error <= this.")] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            help="Samples drawn (seeded) from the data. " + _DEFAULT.format(DEFAULT_EVAL_SAMPLES),
            show_default=False,
        ),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of per-layer error vs compression.")] = None,
    write_report: Annotated[
        bool, typer.Option(help="Also store the result in the artifact's report.json.")
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Measure what compression cost; exit 1 when a gate fails (for CI).

    Example:  lyoncompress eval q/ --reference model/ --min-recovery 0.99 --max-output-error 0.05

    With a recipe:  lyoncompress eval q/ --reference model/ --recipe recipe.yaml  (its eval section)
    """
    options = _recipe_file(recipe).eval.replace(
        tasks=tuple(task or ()),
        data=data,
        samples=samples,
        min_recovery=min_recovery,
        max_output_error=max_output_error,
    )
    with _LayerProgress(_show_progress(quiet, as_json), "evaluating") as progress:
        report = evaluate_artifact(artifact, reference, options, progress=progress)
    if plot is not None:
        plot_layer_errors(report, plot)
    if write_report:
        add_to_report(artifact, "eval", report)
    if as_json:
        _print_json(report)
    else:
        err_console.print(tables.eval_table(report))
        if report["layers"]:
            err_console.print(tables.layer_error_table(report))
        failed = [g for g in report["gates"] if not g["passed"]]
        if report["non_finite"]:
            shown = ", ".join(report["non_finite"][:4])
            err_console.print(
                Text.assemble(("failed: ", "bold red"), f"non-finite values ({shown}): every gate fails")
            )
        elif failed:
            err_console.print("[bold red]gate failed[/]")
        else:
            err_console.print(
                "[green]all gates passed[/]" if report["gates"] else "[green]done[/] (no gate given)"
            )
    if not report["passed"]:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
@_reports_errors
def demo(
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train a digits MLP offline, then factorize (calibrated, distilled), quantize (int8), evaluate.

    Example:  lyoncompress demo
    """
    from lyoncompress.demo import DEMO_EVAL, DEMO_QUANTIZE, DEMO_RECIPE, demo_checkpoint, demo_outputs

    checkpoint = demo_checkpoint()
    fact, quantized = demo_outputs()
    err_console.print(f"demo checkpoint: {checkpoint}")
    show = _show_progress(quiet, as_json)
    with _LayerProgress(show, "factorizing") as progress:
        factorized = factorize_checkpoint(checkpoint, fact, DEMO_RECIPE, force=True, progress=progress)
    with _LayerProgress(show, "quantizing") as progress:
        quantization = quantize_artifact(fact, quantized, DEMO_QUANTIZE, force=True, progress=progress)
    evaluation = evaluate_artifact(quantized, checkpoint, DEMO_EVAL)
    if as_json:
        _print_json({"factorize": factorized, "quantize": quantization, "eval": evaluation})
    else:
        _print_factorized(factorized)
        err_console.print(tables.quantize_table(quantization))
        err_console.print(tables.eval_table(evaluation))
        err_console.print(f"artifacts: {fact} (float factors), {quantized} (int8 factors)")
    if not evaluation["passed"]:
        raise typer.Exit(EXIT_GATE_FAILED)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
