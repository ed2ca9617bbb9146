"""Distillation: SmolLM2-135M (30 blocks) into a layers:15 student; MiniLM-L6 into 3 layers.

    python benchmarks/distill.py [--tokens 131072] [--eval-tokens 8192] [--only NAME ...] [--mass]

SmolLM2 rows share one token budget, one data order (seed 0) and one optimizer schedule, and differ
only in the loss: (a) the student before training, (b) cross-entropy only (alpha 0), (c) KD at
temperature 2 with alpha 0.5 (the CLI defaults), (d) the same KD from the teacher cache (per token: the
16 most likely tokens and 48 draws from the rest), built first in the same process (its build time is reported apart). Training text is the
training side of BBC news; every row is scored on the same held-out Wikipedia windows against the
teacher by squeeze's ``compare_causal``. MiniLM rows: 3 evenly spaced blocks of 6, trained on the
mean-pooled embedding (cosine) plus hidden states (cosine), scored by the mean cosine of the
student's embeddings to the teacher's on held-out Wikipedia windows of 128 tokens. Each row runs
in a fresh subprocess (its own peak RSS), through ``squeeze.api.distill``. Results go to
``benchmarks/results/distill.json`` and to the table in ``benchmarks/README.md`` between the
``distill`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from quantize_rtn import BENCH, SNAPSHOT, WORK, _mib, _run_child, _tail, machine, merge_rows, publish, snapshot_squeeze, table_footer

NAME = "distill"
RESULTS = BENCH / "results" / f"{NAME}.json"
TRAIN_TEXT, EVAL_TEXT = "bbc", "wikipedia"
SEQ_LEN, BATCH_SIZE, LR = 512, 2, 2e-4
ENCODER_SEQ_LEN, ENCODER_BATCH, ENCODER_STEPS = 128, 16, 300


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    teacher: str
    student: str
    options: dict | None  # DistillConfig keywords; None: the student before any training
    cache: bool = False


CONFIGS = [
    Config("untrained", "(a) layers:15, before training", "smollm2", "layers:15", None),
    Config("ce", "(b) cross-entropy only (alpha 0)", "smollm2", "layers:15", dict(alpha=0.0)),
    Config("kd", "(c) KD, tau 2, alpha 0.5, live teacher", "smollm2", "layers:15", dict(alpha=0.5, temperature=2.0)),
    Config("kd-cache", "(d) KD, tau 2, alpha 0.5, teacher cache (top 16 + 48 draws)", "smollm2", "layers:15", dict(alpha=0.5, temperature=2.0), cache=True),
    Config("minilm-untrained", "MiniLM-L6 → layers:3, before training", "minilm", "layers:3", None),
    Config("minilm", "MiniLM-L6 → layers:3, embedding + hidden cosine", "minilm", "layers:3", dict(hidden_loss="cosine")),
]
BY_NAME = {c.name: c for c in CONFIGS}


def _steps(config: Config, tokens: int) -> int:
    if config.teacher == "minilm":
        return ENCODER_STEPS
    return tokens // (BATCH_SIZE * SEQ_LEN)


def worker(name: str, tokens: int, eval_tokens: int, out: Path, result: Path) -> None:
    """One row: train through the API (or score the untrained student) and write its JSON."""
    import squeeze
    from squeeze.api import distill
    from squeeze.data import evaluation_windows
    from squeeze.distill.config import DistillConfig
    from squeeze.distill.student import derive_student, parse_student, resolve_layers, teacher_depth
    from squeeze.evaluate import compare_causal, compare_encoder, peak_rss_bytes
    from squeeze.models import load_model

    print(f"squeeze imported from {squeeze.__file__}", flush=True)
    config = BY_NAME[name]
    encoder = config.teacher == "minilm"
    seq_len = ENCODER_SEQ_LEN if encoder else SEQ_LEN
    eval_budget = min(eval_tokens, 64 * ENCODER_SEQ_LEN) if encoder else eval_tokens
    if config.options is None:
        teacher = load_model(config.teacher)
        windows = evaluation_windows(teacher.tokenizer, EVAL_TEXT, seq_len, eval_budget)
        student = derive_student(teacher.model, resolve_layers(parse_student(config.student), teacher_depth(teacher.model)), 0)
        if encoder:
            enc = compare_encoder(student, teacher.model, windows)
            row = {"cosine_mean": enc.cosine_mean, "cosine_min": enc.cosine_min}
        else:
            cmp = compare_causal(student, windows, teacher.model)
            row = {"perplexity": cmp.perplexity, "teacher_perplexity": cmp.reference_perplexity, "kl": cmp.kl_divergence, "top1": cmp.top1_agreement}
        row.update(eval_windows=int(windows.shape[0]), peak_rss_bytes=peak_rss_bytes(), steps=0, tokens=0)
        result.write_text(json.dumps(row, indent=2) + "\n")
        return
    cache = WORK / "distill-teacher-cache" if config.cache else None
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    options = dict(steps=_steps(config, tokens), lr=LR, batch_size=ENCODER_BATCH if encoder else BATCH_SIZE, eval_every=32, seed=0)
    options.update(config.options)
    report = distill(
        config.teacher, config.student, out, DistillConfig(**options), data=TRAIN_TEXT, eval_data=EVAL_TEXT,
        eval_tokens=eval_budget, seq_len=seq_len, overwrite=True, teacher_cache=cache,
    ).to_dict()
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    acc, training = report["accuracy"], report["training"]
    row = {
        "steps": training["steps"],
        "tokens": training["tokens"],
        "train_s": training["train_seconds"],
        "tokens_per_s": training["tokens_per_second"],
        "s_per_step": training["train_seconds"] / max(training["steps"], 1),
        "cache_build_s": report["timings_s"].get("teacher_cache"),
        "loss_first": training["loss_first"],
        "loss_last": training["loss_last"],
        "teacher_parameters": training["teacher_parameters"],
        "student_parameters": training["student_parameters"],
        "student_bytes": training["student_bytes"],
        "peak_rss_bytes": report["peak_rss_bytes"],
        "eval_windows": acc["windows"],
        "curve": [
            {k: e[k] for k in ("step", "tokens", "loss", "eval_perplexity", "eval_cosine") if k in e}
            for e in json.loads((out / "loss_curve.json").read_text())
        ],
        "settings": report["settings"],
    }
    if encoder:
        row.update(cosine_mean=acc["embedding_cosine_mean"], cosine_min=acc["embedding_cosine_min"])
    else:
        row.update(perplexity=acc["perplexity_after"], teacher_perplexity=acc["perplexity_before"], kl=acc["kl_divergence"], top1=acc["top1_agreement"])
    result.write_text(json.dumps(row, indent=2) + "\n")


MASS_WINDOWS, MASS_TOP = 4, (16, 64, 256, 1024)


def teacher_mass() -> dict:
    """Share of SmolLM2's next-token probability held by its k most likely tokens, at tau 1 and 2,
    averaged over the positions of the first training windows: what a top-k cache can keep."""
    import torch

    from squeeze.data import training_windows
    from squeeze.models import load_model

    teacher = load_model("smollm2")
    windows = training_windows(teacher.tokenizer, TRAIN_TEXT, SEQ_LEN)[:MASS_WINDOWS]
    with torch.no_grad():
        logits = teacher.model(input_ids=windows).logits[:, :-1].float()
    shares = {}
    for tau in (1.0, 2.0):
        top = torch.softmax(logits / tau, -1).topk(max(MASS_TOP), -1).values.cumsum(-1)
        shares[f"tau {tau:g}"] = {str(k): float(top[..., k - 1].mean()) for k in MASS_TOP}
    return {"windows": MASS_WINDOWS, "seq_len": SEQ_LEN, "text": TRAIN_TEXT, "share": shares}


def run(config: Config, tokens: int, eval_tokens: int) -> dict:
    out, log, result = WORK / f"distill-{config.name}", WORK / f"distill-{config.name}.log", WORK / f"distill-{config.name}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config.name, "--tokens", str(tokens),
           "--eval-tokens", str(eval_tokens), "--out", str(out), "--result", str(result)]  # fmt: skip
    code, wall, load = _run_child(cmd, log)
    shutil.rmtree(out, ignore_errors=True)
    base = {"tool": "squeeze", "config": config.name, "label": config.label}
    if code != 0 or not result.exists():
        return {**base, "error": f"exit {code}: {_tail(log)}"}
    return {**base, **json.loads(result.read_text()), "wall_s": wall, "load_avg_before": load}


def _sources(result: dict) -> str:
    """The squeeze version each row ran, when rows come from more than one invocation."""
    by_source: dict[str, list[str]] = {}
    for row in result["rows"]:
        by_source.setdefault(row.get("squeeze_source", result["squeeze_source"]), []).append(row["config"])
    if len(by_source) == 1:
        return next(iter(by_source))
    return "; ".join(f"{source} ({', '.join(configs)})" for source, configs in by_source.items())


def _rows(rows: list[dict]) -> dict[str, dict]:
    return {r["config"]: r for r in rows if "error" not in r}


def targets(rows: list[dict]) -> list[dict]:
    by = _rows(rows)
    checks = []
    ce, kd, cached, untrained = by.get("ce"), by.get("kd"), by.get("kd-cache"), by.get("untrained")
    teacher = next((r["teacher_perplexity"] for r in (kd, ce, untrained) if r and r.get("teacher_perplexity")), None)
    checks.append({
        "target": "KD beats cross-entropy only at equal tokens (Wikipedia perplexity)",
        "measured": f"KD {kd['perplexity']:.2f} vs CE {ce['perplexity']:.2f}" if kd and ce else "-",
        "pass": (kd["perplexity"] < ce["perplexity"]) if kd and ce else None,
    })
    checks.append({
        "target": "the cached run is faster per step than the live-teacher run",
        "measured": f"{cached['s_per_step']:.2f} s vs {kd['s_per_step']:.2f} s per step ({kd['s_per_step'] / cached['s_per_step']:.2f}x)"
        if kd and cached else "-",
        "pass": (cached["s_per_step"] < kd["s_per_step"]) if kd and cached else None,
    })
    if kd and untrained and teacher:
        closed = (untrained["perplexity"] - kd["perplexity"]) / (untrained["perplexity"] - teacher)
        closed_log = (math.log(untrained["perplexity"]) - math.log(kd["perplexity"])) / (math.log(untrained["perplexity"]) - math.log(teacher))
        checks.append({
            "target": "KD closes at least half of the gap between the untrained student and the teacher",
            "measured": f"{closed:.1%} of the perplexity gap, {closed_log:.1%} of the log-perplexity (nats) gap "
            f"({untrained['perplexity']:,.0f} → {kd['perplexity']:.2f}; teacher {teacher:.2f})",
            "pass": closed >= 0.5 and closed_log >= 0.5,
        })
    else:
        checks.append({"target": "KD closes at least half of the gap", "measured": "-", "pass": None})
    return checks


def table(result: dict) -> str:
    m, rows = result["machine"], result["rows"]
    lines = [
        f"SmolLM2-135M-Instruct (fp32) → `layers:15`, trained on {TRAIN_TEXT} (training side), scored on {result['eval_tokens']:,} held-out "
        f"{EVAL_TEXT} tokens against the teacher; {result['tokens']:,} training tokens per trained row ({SEQ_LEN}-token windows, "
        f"batch {BATCH_SIZE}, AdamW lr {LR:g}, 5% warmup, cosine to 0.1x, seed 0). Machine: {m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads), torch {m['torch']}, transformers {m['transformers']}, {m['date']}. squeeze {_sources(result)}.",
        "",
        "| row | perplexity | KL vs teacher | top-1 agreement | tokens | steps | s/step | tokens/s | cache build s | train s | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = _rows(rows)
    teacher = next((r.get("teacher_perplexity") for r in by.values() if r.get("teacher_perplexity")), None)
    if teacher:
        lines.append(f"| teacher (30 blocks) | {teacher:.2f} | 0 | 100% | - | - | - | - | - | - | - |")
    for r in rows:
        if r["config"].startswith("minilm"):
            continue
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]} |" + " |" * 9)
            continue
        trained = r["steps"] > 0
        lines.append(
            f"| {r['label']} | {r['perplexity']:,.2f} | {r['kl']:.3f} | {r['top1']:.1%} | {r['tokens']:,} | {r['steps']} | "
            + (f"{r['s_per_step']:.2f} | {r['tokens_per_s']:.0f} | " if trained else "- | - | ")
            + (f"{r['cache_build_s']:.0f} | " if r.get("cache_build_s") else "- | ")
            + (f"{r['train_s']:.0f} | " if trained else "- | ")
            + f"{_mib(r['peak_rss_bytes'])} |"
        )
    encoder = [r for r in rows if r["config"].startswith("minilm")]
    if encoder:
        lines += [
            "",
            f"all-MiniLM-L6-v2 → `layers:3` (blocks 0, 2, 5 kept), {ENCODER_STEPS} steps of {ENCODER_BATCH} x {ENCODER_SEQ_LEN}-token "
            f"{TRAIN_TEXT} windows; embedding cosine to the teacher on held-out {EVAL_TEXT} windows of {ENCODER_SEQ_LEN} tokens:",
            "",
            "| row | mean cosine | min cosine | tokens | s/step | train s | peak RSS |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in encoder:
            if "error" in r:
                lines.append(f"| {r['label']} | error: {r['error'][:120]} | | | | | |")
                continue
            trained = r["steps"] > 0
            lines.append(
                f"| {r['label']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | {r['tokens']:,} | "
                + (f"{r['s_per_step']:.2f} | {r['train_s']:.0f} | " if trained else "- | - | ")
                + f"{_mib(r['peak_rss_bytes'])} |"
            )
    curves = [r for r in rows if r.get("curve") and not r["config"].startswith("minilm")]
    if curves:
        lines += ["", "Held-out perplexity (8 Wikipedia windows) during training:", ""]
        steps = sorted({e["step"] for r in curves for e in r["curve"] if "eval_perplexity" in e})
        lines.append("| row | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|" + "---|" * len(steps))
        for r in curves:
            at = {e["step"]: e["eval_perplexity"] for e in r["curve"] if "eval_perplexity" in e}
            lines.append(f"| {r['label']} | " + " | ".join(f"{at[s]:,.1f}" if s in at else "-" for s in steps) + " |")
    mass = result.get("teacher_mass")
    if mass:
        lines += [
            "",
            f"Share of the teacher's next-token probability held by its k most likely tokens (mean over the positions of "
            f"{mass['windows']} {mass['text']} windows of {mass['seq_len']} tokens; `--mass`):",
            "",
            "| | " + " | ".join(f"k = {k}" for k in next(iter(mass["share"].values()))) + " |",
            "|---|" + "---|" * len(next(iter(mass["share"].values()))),
        ]
        for tau, shares in mass["share"].items():
            lines.append(f"| {tau} | " + " | ".join(f"{v:.1%}" for v in shares.values()) + " |")
    return "\n".join(lines + table_footer(result))


STANDING_NOTES = [
    "s/step and tokens/s: optimizer steps only (teacher forward, student forward and backward, loss, AdamW); the cache row's "
    "teacher pass is 'cache build s', done once before training. train s excludes loading, evaluation and saving.",
    "Peak RSS is the whole worker process: teacher, student, AdamW moments and the final evaluation.",
    "KD rows use alpha 0.5 (half KD, half cross-entropy), the CLI default. The cache stores, per token, the teacher's 16 most "
    "likely tokens and 48 draws from its distribution off those 16 (log-probabilities at tau 2 in float16, and ids); the KD "
    "term from the cache is an unbiased estimate of the full KL.",
    "An earlier run of row (d) (2026-11-23 06:05 UTC, same settings) cached only the top 64 tokens and treated the rest of the "
    "vocabulary as one outcome: 209.05 perplexity, worse than cross-entropy alone; most of the teacher's mass at tau 2 lies "
    "outside its top 64 (see the mass table), so most of the KD signal was lost. The cache now draws from the rest.",
]


def write(result: dict) -> None:
    """Derive notes and target checks, carry the teacher-mass measurement over, write JSON and table."""
    if "teacher_mass" not in result and RESULTS.exists():
        earlier = json.loads(RESULTS.read_text()).get("teacher_mass")
        if earlier:
            result["teacher_mass"] = earlier
    result["notes"] = [*result.get("run_notes", []), *STANDING_NOTES]
    result["targets"] = targets(result["rows"])
    publish(result, RESULTS, table(result), NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="training tokens per SmolLM2 row")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out Wikipedia tokens")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run only these rows")
    parser.add_argument("--render", action="store_true", help=f"only rebuild the README table from {RESULTS.name}")
    parser.add_argument("--mass", action="store_true", help="only measure how much of the teacher's mass its top-k tokens hold")
    parser.add_argument("--worker", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens, args.eval_tokens, args.out, args.result)
        return
    if args.render:
        write(json.loads(RESULTS.read_text()))
        return
    if args.mass:
        result = json.loads(RESULTS.read_text())
        result.setdefault("run_notes", [n for n in result["notes"] if n.startswith("rows from more than one")])
        result["teacher_mass"] = teacher_mass()
        write(result)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    source = snapshot_squeeze()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SNAPSHOT), os.environ.get("PYTHONPATH")]))
    previous = []
    if args.only and RESULTS.exists():
        earlier = json.loads(RESULTS.read_text())
        previous = [{"squeeze_source": earlier["squeeze_source"], **row} for row in earlier["rows"]]
    rows: list[dict] = []
    notes: list[str] = []
    for config in [BY_NAME[n] for n in args.only] if args.only else CONFIGS:
        print(f"{config.name} ...", flush=True)
        rows.append({**run(config, args.tokens, args.eval_tokens), "squeeze_source": source})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("curve", "settings")}), flush=True)
        merged = merge_rows(previous, rows, [c.name for c in CONFIGS])
        write(_result(args, source, merged, notes))
    if previous:
        notes.append("rows from more than one invocation: see each row's load average, and the JSON for each row's run")
        write(_result(args, source, merge_rows(previous, rows, [c.name for c in CONFIGS]), notes))


def _result(args: argparse.Namespace, source: str, rows: list[dict], notes: list[str]) -> dict:
    return {
        "benchmark": NAME,
        "teacher": "smollm2",
        "train_text": TRAIN_TEXT,
        "eval_text": EVAL_TEXT,
        "seq_len": SEQ_LEN,
        "tokens": args.tokens,
        "eval_tokens": args.eval_tokens,
        "squeeze_source": source,
        "machine": machine(),
        "rows": rows,
        "run_notes": notes,
    }


if __name__ == "__main__":
    main()
