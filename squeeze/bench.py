"""Regression benchmarks: recipes run on real models, compared with committed baselines.

A cases file (benchmarks/cases.yaml) lists cases (model × recipe × data, with the small
calibration and training budgets that make them quick) and, per metric, how much worse a result
may be before it counts as a regression. Baselines live beside it in baselines/SUITE.json; a
``full`` run also appends one line to history/full.jsonl.

Time is stored as a ratio to a reference operation timed in the same run (float32 matrix
products, a fixed amount of work), so a slower or busier machine moves both and the ratio stays.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from squeeze import __version__
from squeeze.chain import plan_run, run_recipe
from squeeze.device import machine
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.recipes import load_recipe, recipe_from_stages
from squeeze.safe_yaml import describe, read_yaml

SUITES = ("ci", "full")
# metric → (worse when it goes "up" or "down", default tolerance, absolute slack below which changes are noise)
METRICS: dict[str, tuple[str, float, float]] = {
    "perplexity": ("up", 0.01, 0.0),
    "kl_divergence": ("up", 0.05, 1e-5),
    "top1_agreement": ("down", 0.01, 0.0),
    "embedding_cosine": ("down", 0.005, 0.0),  # encoders: mean cosine of pooled embeddings vs the original
    "disk_bytes": ("up", 0.001, 0.0),
    "time_ratio": ("up", 0.5, 0.0),
}


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str
    recipe: str  # path relative to the cases file
    suites: tuple[str, ...] = SUITES
    data: str = "wikipedia"
    seq_len: int = Field(256, ge=1)
    eval_tokens: int = Field(4096, ge=1)
    overrides: dict[str, Any] = {}  # stage options set wherever a stage has them, e.g. calib_samples, steps


class CasesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerances: dict[str, float] = {}
    cases: list[Case]


@dataclass
class Outcome:
    """One case's new metrics, and how each compares with the baseline."""

    case: str
    metrics: dict[str, float]
    rows: list[tuple[str, float | None, float, float, str]] = field(default_factory=list)  # metric, old, new, limit, verdict

    @property
    def regressed(self) -> bool:
        return any(verdict == "REGRESSED" for *_, verdict in self.rows)


def load_cases(path: Path) -> CasesFile:
    path = Path(path)
    if not path.is_file():
        raise SqueezeError(f"cases file {path} does not exist")
    text = path.read_text()
    try:
        data, _ = read_yaml(text)
        cases = CasesFile(**(data or {}))
    except yaml.YAMLError as exc:
        raise SqueezeError(f"not valid YAML: {describe(exc, text, path)}") from None
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SqueezeError(f"{path}: {details}") from None
    except TypeError as exc:
        raise SqueezeError(f"{path}: a cases file is a mapping with 'cases' (and 'tolerances'): {exc}") from None
    unknown = set(cases.tolerances) - set(METRICS)
    if unknown:
        raise SqueezeError(f"{path}: unknown tolerance(s) {sorted(unknown)}; metrics are {', '.join(METRICS)}")
    names = [case.name for case in cases.cases]
    if len(set(names)) != len(names):
        raise SqueezeError(f"{path}: case names must be unique")
    for case in cases.cases:
        if not set(case.suites) <= set(SUITES):
            raise SqueezeError(f"{path}: case {case.name}: suites are {', '.join(SUITES)}, got {list(case.suites)}")
    return cases


def reference_seconds(repeats: int = 5) -> float:
    """Median seconds of a fixed float32 workload (24 products of 768 x 768 matrices): the unit
    that case times are divided by."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(768, 768, generator=generator)
    b = torch.randn(768, 768, generator=generator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        c = a
        for _ in range(24):
            c = torch.tanh(c @ b / 28.0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _case_recipe(case: Case, cases_path: Path):
    """The case's recipe with its overrides applied to every stage that has the option."""
    recipe = load_recipe((cases_path.parent / case.recipe).resolve())
    stages = []
    for stage in recipe.stages:
        update = {k: v for k, v in case.overrides.items() if k in type(stage).model_fields}
        if "steps" in update and "tokens" in type(stage).model_fields:
            update["tokens"] = None
        stages.append(type(stage)(**(stage.model_dump(exclude_unset=True) | update)))
    used = {k for k in case.overrides if any(k in type(s).model_fields for s in recipe.stages)}
    if set(case.overrides) - used:
        raise SqueezeError(f"case {case.name}: no stage of {case.recipe} has option(s) {sorted(set(case.overrides) - used)}")
    return recipe_from_stages(stages, name=recipe.name, data=case.data, seq_len=case.seq_len, eval_tokens=case.eval_tokens)


def run_case(case: Case, cases_path: Path, device: str = "cpu", progress=None) -> dict[str, float]:
    """Run one case in a temporary folder; its metrics (of the last stage; seconds over all stages)."""
    recipe = _case_recipe(case, cases_path)
    with tempfile.TemporaryDirectory(prefix="squeeze-bench-") as tmp:
        # generation agreement is not a gated metric: leave it out of the timed stages
        summary = run_recipe(recipe, case.model, Path(tmp) / "run", device=device, progress=progress, generation_prompts=0)
    last = summary["rows"][-1]
    seconds = sum(row["seconds"] or 0.0 for row in summary["rows"][1:])
    metrics = {"disk_bytes": float(last["disk_bytes"]), "seconds": seconds}
    for key in ("perplexity", "kl_divergence", "top1_agreement", "embedding_cosine"):
        if last.get(key) is not None:
            metrics[key] = float(last[key])
    return metrics


def compare(case: str, new: dict[str, float], old: dict[str, float] | None, tolerances: dict[str, float]) -> Outcome:
    """Each metric against its baseline: REGRESSED past the tolerance, better, ok, or new."""
    outcome = Outcome(case, new)
    for metric, (worse, default, slack) in METRICS.items():
        if metric not in new:
            continue
        value = new[metric]
        before = None if old is None else old.get(metric)
        tolerance = tolerances.get(metric, default)
        if before is None:
            outcome.rows.append((metric, None, value, float("nan"), "new"))
            continue
        if worse == "up":
            limit = before * (1 + tolerance) + slack
            verdict = "REGRESSED" if value > limit else ("better" if value < before * (1 - tolerance) - slack else "ok")
        else:
            limit = before - tolerance - slack
            verdict = "REGRESSED" if value < limit else ("better" if value > before + tolerance + slack else "ok")
        outcome.rows.append((metric, before, value, limit, verdict))
    return outcome


def commit(where: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class BenchRun:
    suite: str
    outcomes: list[Outcome]
    unit_seconds: float
    baseline_file: Path
    baseline: dict[str, Any] | None

    @property
    def regressed(self) -> bool:
        return any(o.regressed for o in self.outcomes)

    def record(self, cases_path: Path) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(cases_path.parent),
            "squeeze_version": __version__,
            "machine": machine(),
            "reference_op_seconds": self.unit_seconds,
            "cases": {o.case: o.metrics for o in self.outcomes},
        }


def replace_section(file: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a markdown file
    (a new ``## name`` section at the end when the markers are not there yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = file.read_text() if file.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + f"\n\n## {name}\n\n" + block + "\n"
    file.write_text(current)


def baseline_table(record: dict[str, Any]) -> str:
    """Markdown table of a suite's baseline, with the machine and commit it was measured on."""
    lines = [
        f"Baseline of `squeeze bench --suite {record['suite']}` on {record['machine']}; last updated {record['created']} "
        f"at commit {record['commit']} (reference op {record['reference_op_seconds'] * 1000:.1f} ms in that run).",
        "",
        "| case | perplexity | KL vs original | top-1 | embedding cosine | MiB on disk | seconds | time ratio | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in sorted(record["cases"].items()):
        cells = [
            name,
            f"{m['perplexity']:.3f}" if "perplexity" in m else "-",
            f"{m['kl_divergence']:.4f}" if "kl_divergence" in m else "-",
            f"{100 * m['top1_agreement']:.2f}%" if "top1_agreement" in m else "-",
            f"{m['embedding_cosine']:.4f}" if "embedding_cosine" in m else "-",
            f"{m['disk_bytes'] / 2**20:,.1f}",
            f"{m['seconds']:,.1f}",
            f"{m['time_ratio']:,.0f}",
            record.get("measured", {}).get(name, "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_suite(
    cases_path: Path, suite: str, only: tuple[str, ...] = (), update: bool = False, device: str = "cpu",
    on_case=None, progress=None,
) -> BenchRun:
    """Run the suite's cases and compare them with baselines/SUITE.json; ``update`` rewrites it
    with this run; a ``full`` run is appended to history/full.jsonl."""
    cases_path = Path(cases_path)
    if suite not in SUITES:
        raise SqueezeError(f"unknown suite {suite!r}; choose one of: {', '.join(SUITES)}")
    spec = load_cases(cases_path)
    chosen = [c for c in spec.cases if suite in c.suites and (not only or c.name in only)]
    missing = set(only) - {c.name for c in spec.cases}
    if missing:
        raise SqueezeError(f"no case named {', '.join(sorted(missing))} in {cases_path}")
    if not chosen:
        raise SqueezeError(f"{cases_path} has no case in suite {suite!r}")
    for case in chosen:  # every case is checked against its model before the first one runs
        plan_run(_case_recipe(case, cases_path), case.model)
    baseline_file = cases_path.parent / "baselines" / f"{suite}.json"
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else None
    unrecorded = [c.name for c in chosen if c.name not in (baseline or {}).get("cases", {})]
    if unrecorded and not update:
        raise OptionError(f"no baseline for {literal(', '.join(unrecorded))} in {literal(baseline_file)}: record one with {{0}}", "update")
    before = reference_seconds()
    results = []
    for index, case in enumerate(chosen):
        if on_case:
            on_case(index, len(chosen), case)
        results.append(run_case(case, cases_path, device, progress))
    # time against the mean of the unit before and after, so a machine that got busier mid-run counts half
    unit = (before + reference_seconds()) / 2
    old = (baseline or {}).get("cases", {})
    outcomes = []
    for case, metrics in zip(chosen, results):
        metrics["time_ratio"] = metrics["seconds"] / unit
        outcomes.append(compare(case.name, metrics, old.get(case.name), spec.tolerances))
    run = BenchRun(suite, outcomes, unit, baseline_file, baseline)
    record = run.record(cases_path)
    if update:
        old_cases = {} if baseline is None else baseline.get("cases", {})
        kept = {k: v for k, v in old_cases.items() if k not in record["cases"]}
        measured = {k: v for k, v in (baseline or {}).get("measured", {}).items() if k in kept}
        baseline_file.parent.mkdir(parents=True, exist_ok=True)
        record["measured"] = measured | {name: f"{record['created']} at {record['commit']}" for name in record["cases"]}
        record["cases"] = kept | record["cases"]
        baseline_file.write_text(json.dumps(record, indent=2) + "\n")
        replace_section(cases_path.parent / "README.md", f"bench-{suite}", baseline_table(record))
    if suite == "full":
        history = cases_path.parent / "history"
        history.mkdir(exist_ok=True)
        with open(history / "full.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return run
