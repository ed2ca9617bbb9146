"""RTN quantization of SmolLM2: accuracy, size, time and memory per scheme, next to llm-compressor.

    python benchmarks/quantize_rtn.py [--eval-tokens 16384] [--only NAME ...] [--no-peers]

Each configuration runs in a fresh subprocess (so peak RSS is that configuration's alone) which
calls ``squeeze.api.quantize`` into ``benchmarks/work/<name>/``; the runner reads its report.json
and deletes the checkpoint. The peer (llm-compressor, in ``benchmarks/peers/.venv``, made by
``benchmarks/peers/setup.sh``) runs the same way through ``benchmarks/peers/llmcompressor_rtn.py``,
scored by squeeze's own evaluation on the same windows. Results go to
``benchmarks/results/quantize_rtn.json`` and to the table in ``benchmarks/README.md`` between the
``quantize_rtn`` markers. Nothing here is a hard-coded result: every number comes from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work"
SNAPSHOT = WORK / "squeeze-src"  # the copy of squeeze/ that this run's subprocesses import
RESULTS = BENCH / "results" / "quantize_rtn.json"
README = BENCH / "README.md"
PEER_PYTHON = BENCH / "peers" / ".venv" / "bin" / "python"
PEER_SCRIPT = BENCH / "peers" / "llmcompressor_rtn.py"

MODEL = "smollm2"
DATA = "wikipedia"
SEQ_LEN = 512
BATCH_SIZE = 2


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    options: dict  # keyword arguments of squeeze.quant.scheme.scheme_from_options
    peer: bool  # llm-compressor runs the same scheme (llmcompressor_rtn.py knows this name)


CONFIGS = [
    Config("w8-per-tensor", "W8 per-tensor", dict(mode="per-tensor", bits=8), peer=False),
    Config("w8-per-channel", "W8 per-channel", dict(mode="per-channel", bits=8), peer=True),
    Config("w8a8", "W8A8 (per-channel W, per-token A)", dict(mode="per-channel", bits=8, act="per-token"), peer=True),
    Config(
        "w8a8-asym-act",
        "W8A8, asymmetric per-token A",
        dict(mode="per-channel", bits=8, act="per-token", act_asym=True),
        peer=False,
    ),
    Config("w4-per-channel", "W4 per-channel sym", dict(mode="per-channel", bits=4), peer=False),
    Config("w4-g64", "W4 group-64 sym", dict(mode="per-group", bits=4, group_size=64), peer=True),
]
BY_NAME = {c.name: c for c in CONFIGS}


# ---------------------------------------------------------------------------------------------
# One configuration, in its own process


def worker(name: str, eval_tokens: int, out: Path) -> None:
    """Quantize with squeeze into ``out`` (the subprocess side); the report lands in out/report.json."""
    import squeeze
    from squeeze.api import quantize
    from squeeze.quant.apply import QuantizeConfig
    from squeeze.quant.scheme import scheme_from_options

    print(f"squeeze imported from {squeeze.__file__}", flush=True)  # the run's snapshot, not the live tree

    config = QuantizeConfig(scheme=scheme_from_options(**BY_NAME[name].options))
    quantize(MODEL, out, config, data=DATA, eval_tokens=eval_tokens, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, overwrite=True)


def snapshot_squeeze(root: Path = SNAPSHOT) -> str:
    """Copy squeeze/ to ``root`` (default benchmarks/work/squeeze-src) so every subprocess of the
    run imports the same code.

    squeeze is edited while benchmarks run; without a snapshot, configurations started minutes
    apart could measure different code. Returns the snapshot's identity (see squeeze_source).
    """
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(REPO / "squeeze", root / "squeeze", ignore=shutil.ignore_patterns("__pycache__"))
    return squeeze_source()


def snapshot_for_children(root: Path = SNAPSHOT) -> str:
    """:func:`snapshot_squeeze` into ``root`` (a benchmark running beside another takes its own),
    and every subprocess started from here on imports the snapshot."""
    WORK.mkdir(parents=True, exist_ok=True)
    source = snapshot_squeeze(root)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return source


def _run_child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``cmd`` with its output in ``log``; (exit code, wall seconds, 1-minute load average just before).

    The load average shows whether something else competed for the cores while the timings were taken.
    """
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as sink:
        # the snapshot this run took (snapshot_for_children puts it on PYTHONPATH), else the default one
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if not any(Path(p).parent == WORK and Path(p).name.startswith(SNAPSHOT.name) for p in paths):
            paths.insert(0, str(SNAPSHOT))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start, load


def _tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " / ".join(line.strip() for line in text[-lines:]) or "no output"


def run_squeeze(config: Config, eval_tokens: int) -> dict:
    out = WORK / config.name
    log = WORK / f"{config.name}.log"
    WORK.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config.name, "--eval-tokens", str(eval_tokens), "--out", str(out)]
    code, wall, load = _run_child(cmd, log)
    if code != 0:
        return {"tool": "squeeze", "config": config.name, "label": config.label, "error": f"exit {code}: {_tail(log)}"}
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)  # the checkpoint is only needed for its report; disk is finite
    size, acc, timings = report["size"], report["accuracy"], report["timings_s"]
    return {
        "tool": "squeeze",
        "config": config.name,
        "label": config.label,
        "scheme": report["settings"]["scheme"],
        "perplexity_before": acc["perplexity_before"],
        "perplexity_after": acc["perplexity_after"],
        "perplexity_change": acc["perplexity_change"],
        "kl_divergence": acc["kl_divergence"],
        "top1_agreement": acc["top1_agreement"],
        "eval_tokens": acc["tokens"],
        "eval_windows": acc["windows"],
        "checkpoint_bytes": size["disk_bytes_after"],
        "dense_checkpoint_bytes": size["disk_bytes_before"],
        "linear_bytes_before": size["linear_bytes_before"],
        "linear_bytes_after": size["linear_bytes_after"],
        "linear_ratio": size["linear_ratio"],
        "bits_per_weight": size["bits_per_weight"],
        "quantize_s": timings.get("quantize", 0.0) + timings.get("calibrate", 0.0),
        "timings_s": timings,
        "wall_s": wall,
        "load_avg_before": load,
        "peak_rss_bytes": report["peak_rss_bytes"],
    }


def run_peer(config: Config, eval_tokens: int) -> dict:
    out = WORK / f"llmcompressor-{config.name}"
    log = WORK / f"llmcompressor-{config.name}.log"
    result = WORK / f"llmcompressor-{config.name}.json"
    result.unlink(missing_ok=True)
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), config.name, "--eval-tokens", str(eval_tokens), "--out", str(out), "--result", str(result)]
    code, wall, load = _run_child(cmd, log)
    if code != 0 or not result.exists():
        return {"tool": "llm-compressor", "config": config.name, "label": config.label, "error": f"exit {code}: {_tail(log)}"}
    row = json.loads(result.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": "llm-compressor", "config": config.name, "label": config.label, **row, "wall_s": wall, "load_avg_before": load}


# ---------------------------------------------------------------------------------------------
# Machine, targets, table


def squeeze_source() -> str:
    """The commit of the squeeze code the runs import, plus a hash of any uncommitted change to squeeze/."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    diff = git("diff", "HEAD", "--", "squeeze")
    if not diff:
        return commit
    import hashlib

    return f"{commit}+uncommitted-{hashlib.sha1(diff.encode()).hexdigest()[:8]}"


def machine() -> dict:
    import psutil
    import torch
    import transformers

    from squeeze.device import cpu_name

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if PEER_PYTHON.exists():
        probe = "import importlib.metadata as m; print(m.version('llmcompressor'), m.version('transformers'), m.version('torch'), m.version('compressed-tensors'))"
        found = subprocess.run([str(PEER_PYTHON), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0:
            llmc, tf, pt, ct = found.stdout.split()
            info["peer_llmcompressor"] = llmc
            info["peer_transformers"] = tf
            info["peer_torch"] = pt
            info["peer_compressed_tensors"] = ct
    return info


def targets(rows: list[dict]) -> list[dict]:
    """The issue's expectations, each checked against this run's squeeze rows."""
    ours = {r["config"]: r for r in rows if r["tool"] == "squeeze" and "error" not in r}
    checks = []

    def check(claim: str, names: tuple[str, ...], test, measured) -> None:
        if all(n in ours for n in names):
            rs = [ours[n] for n in names]
            checks.append({"target": claim, "measured": measured(*rs), "pass": bool(test(*rs))})
        else:
            checks.append({"target": claim, "measured": "not run", "pass": None})

    pct = lambda r: f"{100 * r['perplexity_change']:+.2f}%"  # noqa: E731
    check("W8 per-channel perplexity within 1% of fp32", ("w8-per-channel",), lambda r: abs(r["perplexity_change"]) <= 0.01, pct)
    check("W8A8 RTN perplexity within 3% of fp32", ("w8a8",), lambda r: abs(r["perplexity_change"]) <= 0.03, pct)
    check(
        "W8A8 RTN with asymmetric per-token activations within 3% of fp32",
        ("w8a8-asym-act",),
        lambda r: abs(r["perplexity_change"]) <= 0.03,
        pct,
    )
    check(
        "W8 per-channel visibly better than per-tensor",
        ("w8-per-channel", "w8-per-tensor"),
        # "visibly": less than half the perplexity change and lower KL, not a tie within noise
        lambda c, t: c["perplexity_change"] < 0.5 * t["perplexity_change"] and c["kl_divergence"] < t["kl_divergence"],
        lambda c, t: f"{pct(c)} vs {pct(t)}; KL {c['kl_divergence']:.4f} vs {t['kl_divergence']:.4f}",
    )
    for name in ("w8-per-tensor", "w8-per-channel", "w8a8"):
        check(
            f"int8 ({name}) Linear weights ≤ 26% of fp32 bytes",
            (name,),
            lambda r: r["linear_ratio"] <= 0.26,
            lambda r: f"{100 * r['linear_ratio']:.2f}%",
        )
    for name in ("w4-per-channel", "w4-g64"):
        check(
            f"int4 ({name}) Linear weights ≤ 14% of fp32 bytes",
            (name,),
            lambda r: r["linear_ratio"] <= 0.14,
            lambda r: f"{100 * r['linear_ratio']:.2f}%",
        )
    return checks


def _quantize_and_save(row: dict) -> float:
    """Seconds from dense model to checkpoint files: llm-compressor packs at save time, squeeze while quantizing."""
    return row["quantize_s"] + row["timings_s"].get("save", 0.0)


def _mib(n: float) -> str:
    return f"{n / 1024**2:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(result: dict) -> str:
    m, rows, fp32 = result["machine"], result["rows"], result["fp32"]
    lines = [
        f"Model: SmolLM2-135M-Instruct (squeeze built-in `{MODEL}`, fp32), RTN, every Linear layer but lm_head. "
        f"Evaluation: {fp32['eval_windows']} non-overlapping windows of {SEQ_LEN} tokens "
        f"({fp32['eval_tokens']:,} predicted tokens) of the `{DATA}` evaluation split, batch {BATCH_SIZE}; "
        "original and quantized model scored on the same windows in one pass.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1024**3:.1f} GiB RAM, {m['os']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}"
        + (
            f"; peer venv: llm-compressor {m['peer_llmcompressor']}, transformers {m['peer_transformers']}, "
            f"torch {m['peer_torch']}, compressed-tensors {m['peer_compressed_tensors']}"
            if "peer_llmcompressor" in m
            else ""
        )
        + f". Run {m['date']}, squeeze {result['squeeze_source']}, `--eval-tokens {result['eval_tokens']}`.",
        "",
        "| tool | scheme | perplexity | Δ ppl | KL (nats/token) | top-1 agree | checkpoint MiB | Linear bytes vs fp32 | bits/weight | quantize s | quantize + save s | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| — | fp32 (no quantization) | {fp32['perplexity']:.3f} | — | — | — | {_mib(fp32['checkpoint_bytes'])} | 100% | 32 | — | — | — | — |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['label']} | failed: {r['error'].replace('|', '/')} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['tool']} | {r['label']} | {r['perplexity_after']:.3f} | {100 * r['perplexity_change']:+.2f}% | "
            f"{r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.2f}% | {_mib(r['checkpoint_bytes'])} | "
            f"{100 * r['linear_ratio']:.2f}% | {r['bits_per_weight']:.2f} | {r['quantize_s']:.2f} | {_quantize_and_save(r):.2f} | {r['wall_s']:.0f} | "
            f"{_mib(r['peak_rss_bytes'])} |"
        )
    lines += [
        "",
        "**squeeze ÷ llm-compressor**, same scheme, same run (for time, peak RSS and bytes, below 1 favours squeeze):",
        "",
    ]
    comparisons = result["comparisons"]
    if comparisons:
        lines += [
            "| scheme | Δ ppl squeeze / peer | quantize time | quantize + save time | peak RSS | checkpoint bytes |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['label']} | {c['perplexity_change']} | {c['quantize_s']} | {c['quantize_and_save_s']} | {c['peak_rss_bytes']} | {c['checkpoint_bytes']} |"
            for c in comparisons
        ]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    loads = [r["load_avg_before"] for r in rows if "load_avg_before" in r]
    if loads:
        lines.append(
            f"- 1-minute load average when each configuration started: {min(loads):.1f} to {max(loads):.1f} "
            f"on {m['cores']} cores (above the core count, other work shared the CPU and the times are inflated)."
        )
    lines += ["", "Targets from the issue, checked on this run's squeeze rows:", ""]
    lines += ["| target | measured | result |", "|---|---|---|"]
    for c in result["targets"]:
        verdict = "not run" if c["pass"] is None else ("pass" if c["pass"] else "**FAIL**")
        lines.append(f"| {c['target']} | {c['measured']} | {verdict} |")
    return "\n".join(lines)


def comparisons(rows: list[dict]) -> list[dict]:
    ours = {r["config"]: r for r in rows if r["tool"] == "squeeze" and "error" not in r}
    out = []
    for peer in rows:
        if peer["tool"] == "squeeze" or "error" in peer or peer["config"] not in ours:
            continue
        r = ours[peer["config"]]
        out.append(
            {
                "config": r["config"],
                "label": r["label"],
                "perplexity_change": f"{100 * r['perplexity_change']:+.2f}% / {100 * peer['perplexity_change']:+.2f}% = "
                + _ratio(r["perplexity_change"], peer["perplexity_change"]),
                "quantize_s": _ratio(r["quantize_s"], peer["quantize_s"]),
                "quantize_and_save_s": _ratio(_quantize_and_save(r), _quantize_and_save(peer)),
                "peak_rss_bytes": _ratio(r["peak_rss_bytes"], peer["peak_rss_bytes"]),
                "checkpoint_bytes": _ratio(r["checkpoint_bytes"], peer["checkpoint_bytes"]),
            }
        )
    return out


def table_footer(result: dict) -> list[str]:
    """The notes, the load averages the rows started under, and the targets table of a result."""
    m, rows = result["machine"], result["rows"]
    lines = ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    loads = [r["load_avg_before"] for r in rows if "load_avg_before" in r]
    if loads:
        lines.append(
            f"- 1-minute load average when each row started: {min(loads):.1f} to {max(loads):.1f} on {m['cores']} cores "
            "(above the core count, other work shared the CPU and that row's time is inflated)."
        )
    single = [f"{r['tool']} {r['config']}" for r in rows if r.get("torch_threads") == "1"]
    if single:
        lines.append(
            f"- One torch thread (OMP_NUM_THREADS=1, two benchmarks sharing the 2 cores): {', '.join(single)}; "
            "the other rows ran with torch's default threads, so time ratios between the two kinds overstate the one-thread row."
        )
    lines += ["", "Targets from the issue, checked on this run:", "", "| target | measured | result |", "|---|---|---|"]
    for c in result["targets"]:
        verdict = "not run" if c["pass"] is None else ("pass" if c["pass"] else "**FAIL**")
        lines.append(f"| {c['target']} | {c['measured']} | {verdict} |")
    return lines


def merge_rows(previous: list[dict], rows: list[dict], order: list[str]) -> list[dict]:
    """``rows`` plus the earlier rows this invocation did not rerun, in configuration ``order``, squeeze first."""
    fresh = {(r["tool"], r["config"]) for r in rows}
    merged = [r for r in previous if (r["tool"], r["config"]) not in fresh] + rows
    index = {name: i for i, name in enumerate(order)}
    return sorted(merged, key=lambda r: (index.get(r["config"], 99), r["tool"] != "squeeze", r["tool"]))


def add_run_options(parser, configs: list[str], results: Path) -> None:
    """The options every calibrated benchmark (and its per-row worker) takes."""
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 512 tokens (every tool)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="evaluation tokens per text")
    parser.add_argument("--only", nargs="+", choices=configs, help="run only these configurations")
    parser.add_argument("--no-peers", action="store_true", help="squeeze rows only")
    parser.add_argument("--peers-only", action="store_true", help="peer rows only, merged into the existing results")
    parser.add_argument("--render", action="store_true", help=f"only rebuild the README table from {results.relative_to(REPO)}")
    parser.add_argument("--worker", choices=configs, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def update_readme(section: str, name: str = "quantize_rtn") -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in benchmarks/README.md."""
    from squeeze.bench import replace_section

    replace_section(README, name, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens (whole 512-token windows)")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run only these configurations")
    parser.add_argument("--no-peers", action="store_true", help="skip llm-compressor")
    parser.add_argument(
        "--render", action="store_true", help=f"only rebuild the README table (and derived fields) from {RESULTS.relative_to(REPO)}"
    )
    parser.add_argument("--worker", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.eval_tokens, args.out)
        return
    if args.render:
        write(json.loads(RESULTS.read_text()))
        return

    chosen = [BY_NAME[n] for n in args.only] if args.only else CONFIGS
    notes = []
    WORK.mkdir(parents=True, exist_ok=True)
    source = snapshot_squeeze()
    peers = not args.no_peers and PEER_PYTHON.exists()
    if args.no_peers:
        notes.append("llm-compressor skipped (--no-peers).")
    elif not PEER_PYTHON.exists():
        notes.append(f"llm-compressor skipped: {PEER_PYTHON.relative_to(REPO)} is missing; run benchmarks/peers/setup.sh.")
    rows = []
    for config in chosen:
        print(f"squeeze {config.name} ...", flush=True)
        rows.append(run_squeeze(config, args.eval_tokens))
        print(json.dumps(rows[-1]), flush=True)
        if peers and config.peer:
            print(f"llm-compressor {config.name} ...", flush=True)
            rows.append(run_peer(config, args.eval_tokens))
            print(json.dumps(rows[-1]), flush=True)

    ok = [r for r in rows if "error" not in r]
    if not ok:
        sys.exit("every configuration failed; see benchmarks/work/*.log")
    references = sorted({round(r["perplexity_before"], 6) for r in ok})
    if len(references) > 1:
        notes.append(f"fp32 perplexity differed between runs: {references} (reported: the first squeeze run's).")
    first = next((r for r in ok if r["tool"] == "squeeze"), ok[0])
    fp32 = {
        "perplexity": first["perplexity_before"],
        "eval_tokens": first["eval_tokens"],
        "eval_windows": first["eval_windows"],
        "checkpoint_bytes": first.get("dense_checkpoint_bytes", 0),
    }
    notes.append(
        "Peak RSS is the whole process (ru_maxrss): the dense model, the reference copy kept for evaluation, "
        "the quantized model and evaluation activations; quantize s is the quantization step alone (model load and evaluation excluded); "
        "wall s is the whole subprocess, imports, load and evaluation included."
    )
    notes.append(
        "The fp32 checkpoint size is the dense tensors' bytes (squeeze's disk_bytes_before); the others are the safetensors files written. "
        "Linear bytes vs fp32: codes + scales (+ zero points) of the quantized Linear layers over their fp32 weights."
    )
    if any(r["tool"] == "llm-compressor" and "error" not in r for r in rows):
        notes.append(next(r["how"] for r in rows if r["tool"] == "llm-compressor" and "error" not in r))
        notes.append(
            "llm-compressor's oneshot leaves fake-quantized fp32 weights and packs them into the checkpoint format "
            "inside save_pretrained, while squeeze packs while quantizing; 'quantize + save s' puts the two on the same footing."
        )
    result = {
        "benchmark": "quantize_rtn",
        "model": MODEL,
        "data": DATA,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "eval_tokens": args.eval_tokens,
        "squeeze_source": source,
        "machine": machine(),
        "fp32": fp32,
        "rows": rows,
        "notes": notes,
    }
    write(result)


def write(result: dict) -> None:
    """Derive ratios and target checks from the measured rows, then write the JSON and the README table."""
    result["comparisons"] = comparisons(result["rows"])
    result["targets"] = targets(result["rows"])
    publish(result, RESULTS, table(result), "quantize_rtn")


def run_line(result: dict) -> str:
    """The line under a streaming benchmark's description: the machine, the libraries, when, and which squeeze."""
    m = result["machine"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1024**3:.1f} GiB RAM; torch {m['torch']}, "
        f"transformers {m['transformers']}. Run {m['date']}, squeeze {result['squeeze_source']}."
    )


def publish(result: dict, results: Path, section: str, name: str) -> None:
    """Write a benchmark's result JSON and its README table, and print the table."""
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    update_readme(section, name)
    print(section)


if __name__ == "__main__":
    main()
