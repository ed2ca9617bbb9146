"""``squeeze run`` (a recipe), ``report`` (finished runs side by side) and ``bench`` (the regression cases)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from squeeze import compare
from squeeze.bench import run_suite
from squeeze.chain import check_memory, plan_run, run_recipe
from squeeze.cli.app import (
    DeviceOption, DtypeOption, JsonOption, MemoryBudgetOption, NoEvalOption, OverwriteOption, QuietOption, StreamOption, TrustOption, app,
    call, err, fail, model_stem,
    out,
)
from squeeze.progress import ConsoleProgress, NullProgress


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/): the passes to chain, in order.")],
    model: Annotated[str, typer.Option(help="Model to compress: built-in name (smollm2, minilm), HF directory, .gguf file or hub id.")] = "smollm2",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory, one NN-stage folder per stage plus summary.md/json/png (default ./RECIPE-MODEL).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Evaluation text of every stage (default: the recipe's, else wikipedia).")] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help="Evaluation tokens per stage (default: the recipe's, else 16384).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per window for calibration, training and evaluation (default: the recipe's, else 512).")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe and print the plan (inputs, tokens, memory estimate); run nothing.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT.partial, reusing the stages that finished with the same settings.")] = False,
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    max_shard_size: Annotated[Optional[str], typer.Option(help="Largest safetensors file a stage writes, e.g. 5GB or 500MiB (default: the recipe's, else 5GB).")] = None,
    memory_budget: MemoryBudgetOption = None,
    stream: StreamOption = False,
) -> None:
    """Run a recipe: prune, distill and quantize in one chain, each stage scored against the original; a summary table and plot at the end."""
    if out_dir is None:
        out_dir = Path(f"{recipe.stem}-{model_stem(model)}")
    if dry_run:
        loaded, plan = call(plan_run, recipe, model, data, eval_tokens, seq_len, dtype, not no_eval, trust_remote_code, max_shard_size)
        call(check_memory, plan, memory_budget, stream=stream, device=device)
        _print_plan(loaded, plan, model, out_dir, as_json)
        return
    progress = NullProgress() if quiet else ConsoleProgress(err)

    def announce(entry, reused: bool) -> None:
        if not quiet:
            verb = "reusing" if reused else "running"
            err.print(f"[bold]stage {entry.index + 1}[/]: {verb} {entry.stage.pass_name} → {out_dir}.partial/{entry.folder}", highlight=False)

    summary = call(
        run_recipe, recipe, model, out_dir, data=data, eval_tokens=eval_tokens, seq_len=seq_len, device=device, dtype=dtype,
        evaluate=not no_eval, overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code, progress=progress,
        on_stage=announce, max_shard_size=max_shard_size, memory_budget=memory_budget, stream=stream,
        interrupted=f"interrupted; finished stages are kept in {out_dir}.partial (continue with --resume); {out_dir} is written whole or not at all",
    )
    if summary is None:
        return  # under torchrun, a process other than 0: process 0 reports
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    elif not quiet:
        rows = [compare.Row.from_dict(row) for row in summary["rows"]]
        out.print(compare.to_rich(rows, f"recipe {summary['recipe']}: {model}"))
        out.print(f"wrote {out_dir}/ (one folder per stage, summary.md, summary.json, summary.png)")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.6g}"


def _print_plan(recipe, plan, model: str, out_dir: Path, as_json: bool) -> None:
    def settings(stage) -> str:
        options = stage.model_dump(exclude_defaults=True)
        return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"

    def reads(entry) -> str:
        parts = []
        if entry.calibration_tokens:
            parts.append(f"calibration {entry.calibration_tokens:,}")
        if entry.training_tokens:
            parts.append(f"training {entry.training_tokens:,} ({entry.config.steps} steps)")
        if entry.evaluation_tokens:
            parts.append(f"evaluation {entry.evaluation_tokens:,}")
        return ", ".join(parts) or "-"

    stages = [
        {
            "stage": entry.index + 1, "folder": entry.folder, "pass": entry.stage.pass_name, "input": entry.input,
            "options": entry.stage.model_dump(exclude_defaults=True), "calibration_tokens": entry.calibration_tokens,
            "training_tokens": entry.training_tokens, "evaluation_tokens": entry.evaluation_tokens,
            "memory_estimate_bytes": entry.estimate, "streamed": entry.stream, "calibration_on_disk": entry.spill,
            "memory_estimate_whole_bytes": entry.memory_bytes, "memory_estimate_streamed_bytes": entry.stream_bytes,
            "memory_estimate_spilled_bytes": entry.spill_bytes,
        }
        for entry in plan
    ]
    if as_json:
        sys.stdout.write(json.dumps({"recipe": recipe.name, "model": model, "out": str(out_dir), "data": recipe.data,
                                     "seq_len": recipe.seq_len, "eval_tokens": recipe.eval_tokens, "stages": stages}, indent=2) + "\n")
        return
    table = Table(title=f"plan: recipe {recipe.name} on {model} → {out_dir}/ (nothing run)", title_justify="left")
    for name in ("#", "stage folder", "input", "options", "tokens read", "memory ≈"):
        table.add_column(name, overflow="fold")
    for entry in plan:
        table.add_row(
            str(entry.index + 1), entry.folder, entry.input, settings(entry.stage), reads(entry),
            f"{entry.estimate / 2**30:.1f} GiB" + (" (streamed, calibration on disk)" if entry.spill else " (streamed)" if entry.stream else ""),
        )
    out.print(table)
    out.print(f"evaluation text: {recipe.data}, windows of {recipe.seq_len} tokens; every stage is scored against {model}")
    out.print("memory ≈ is an estimate of the peak RAM of each stage (streamed: one block in memory at a time); the summary shows it next to the measured peak")


@app.command()
def report(
    folders: Annotated[list[Path], typer.Argument(help="Output folders of squeeze runs: recipe runs (summary.json) or single passes (report.json).")],
    plot: Annotated[Path, typer.Option(help="Where the size-vs-perplexity PNG goes.")] = Path("squeeze-report.png"),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Only the table.")] = False,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table as markdown to this file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing plot or markdown file.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Compare finished runs side by side: size, bits per weight, perplexity, KL, time, memory; and a plot of size against perplexity."""
    files = ([] if no_plot else [plot]) + ([markdown] if markdown else [])
    for file in files:
        if file.exists() and not overwrite:
            fail(f"{file} already exists; pass --overwrite to replace it")
        if file.exists() and file.is_dir():
            fail(f"{file} is a folder, not a file")
        if not file.absolute().parent.is_dir():
            fail(f"cannot write {file}: the folder {file.parent} does not exist")
    rows = compare.merge_originals([row for folder in folders for row in call(compare.load_rows, folder)])
    title = "squeeze runs compared"
    if markdown:
        markdown.write_text(compare.to_markdown(rows, title))
    if not no_plot:
        compare.plot(rows, plot, title)
    if as_json:
        sys.stdout.write(json.dumps([row.to_dict() for row in rows], indent=2) + "\n")
        return
    out.print(compare.to_rich(rows, title))
    if files:
        out.print("wrote " + ", ".join(str(f) for f in files))


@app.command()
def bench(
    suite: Annotated[str, typer.Option(help="ci (the quick cases, run by .ci/run) or full (every case; appended to benchmarks/history/).")] = "ci",
    cases: Annotated[Path, typer.Option(help="The cases file; baselines/ and history/ sit beside it.")] = Path("benchmarks/cases.yaml"),
    only: Annotated[list[str], typer.Option(help="Run only this case (repeatable).")] = [],
    update: Annotated[bool, typer.Option("--update", help="Rewrite the suite's baseline with this run's results (deliberately).")] = False,
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Run the regression cases and compare them with the committed baselines; exit 1 when a metric got worse past its tolerance."""
    progress = NullProgress() if quiet else ConsoleProgress(err)

    def announce(index: int, total: int, case) -> None:
        if not quiet:
            err.print(f"[bold]case {index + 1}/{total}[/]: {case.name} ({case.recipe} on {case.model})", highlight=False)

    run = call(run_suite, cases, suite, tuple(only), update, device, on_case=announce, progress=progress)
    if as_json:
        sys.stdout.write(json.dumps([{"case": o.case, "metrics": o.metrics, "regressed": o.regressed} for o in run.outcomes], indent=2) + "\n")
    else:
        table = Table(title=f"squeeze bench --suite {suite}: against {run.baseline_file}", title_justify="left")
        for name in ("case", "metric", "verdict", "baseline", "new", "change", "limit"):
            table.add_column(name, justify="left" if name in ("case", "metric", "verdict") else "right",
                             no_wrap=name in ("metric", "verdict"), overflow="fold")
        styles = {"REGRESSED": "bold red", "better": "green", "new": "yellow"}
        for outcome in run.outcomes:
            for metric, old, new, limit, verdict in outcome.rows:
                change = "-" if old is None or old == 0 else f"{new / old - 1:+.2%}"
                table.add_row(
                    outcome.case, metric, f"[{styles[verdict]}]{verdict}[/]" if verdict in styles else verdict,
                    _number(old), _number(new), change, "-" if old is None else _number(limit),
                )
        out.print(table)
        out.print(f"reference op: {run.unit_seconds * 1000:.1f} ms; time_ratio = case seconds / reference op seconds")
    if update:
        err.print(f"baseline written: {run.baseline_file}")
        return
    if run.regressed:
        names = sorted({o.case for o in run.outcomes if o.regressed})
        fail(f"regression in {', '.join(names)}: a metric is worse than its baseline past the tolerance (rerun with --update only if that is intended)", code=1)
