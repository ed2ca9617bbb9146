"""Inference speed on CPU: SmolLM2 in fp32, bf16, W8A8 (SmoothQuant) and W4A16 (GPTQ) side by side.

    python benchmarks/infer.py [--calib-samples 64] [--repeats 3] [--rebuild]

Makes the compressed checkpoints once (benchmarks/work/infer/, reused unless --rebuild) with
``squeeze quantize``, then runs ``squeeze bench-infer smollm2 --compare ...`` once, so that every
form is measured in the same run on the same prompt: prefill of 512 tokens (last position's logits,
as generation does), 128 greedy decode steps with the KV cache, best of ``--repeats``; each form
in its own process for a clean peak RSS. Generation agreement: ROUGE-1/2/L and BLEU of each form's
greedy continuations (8 prompts x 32 tokens of held-out Wikipedia) against fp32's.
Results go to ``benchmarks/results/infer.json`` (appended to ``benchmarks/history/infer.jsonl``)
and the table between the ``infer`` markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "infer"
RESULTS = BENCH / "results" / "infer.json"
HISTORY = BENCH / "history" / "infer.jsonl"  # every run, one line each: this machine's timings vary run to run
SQUEEZE = [sys.executable, "-m", "squeeze.cli"]
CHECKPOINTS = {
    # name: squeeze quantize options
    "w8a8-smoothquant": ["--method", "smoothquant", "--act", "per-token"],
    "w4a16-gptq-g64": ["--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "64"],
    "w8a16-rtn": ["--bits", "8"],
}
TARGETS = {"decode": 1.5, "prefill": 2.0, "weights": 0.4}  # W8A8 vs fp32, from the issue


def build(name: str, options: list[str], calib_samples: int, rebuild: bool) -> Path:
    out = WORK / name
    if out.exists() and not rebuild:
        return out
    if out.exists():
        shutil.rmtree(out)
    WORK.mkdir(parents=True, exist_ok=True)
    command = SQUEEZE + ["quantize", "smollm2", *options, "--calib-samples", str(calib_samples), "--eval-tokens", "4096", "--out", str(out), "-q"]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
    return out


def table(result: dict) -> str:
    base = result["forms"][0]["label"]
    lines = [
        f"SmolLM2-135M, {result['prefill_tokens']}-token prefill and {result['decode_tokens']}-token greedy decode, best of "
        f"{result['repeats']}; {result['machine']}; measured {result['measured']} at {result['commit']}.",
        "",
        "| form | runs on | prefill tok/s | decode tok/s | weights in memory | peak RSS | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for form in result["forms"]:
        r = form[f"ratios_vs_{base}"]
        a = form.get("agreement")
        agree = [f"{a['rouge1']:.3f}", f"{a['rouge2']:.3f}", f"{a['rougeL']:.3f}", f"{a['bleu']:.1f}"] if a else ["ref"] * 4
        lines.append(
            f"| {form['label']} | {form['runs_on']} | {form['prefill_tokens_per_s']:,.0f} ({r['prefill']:.2f}x) | "
            f"{form['decode_tokens_per_s']:,.1f} ({r['decode']:.2f}x) | {form['weight_bytes'] / 2**20:,.1f} MiB ({r['weights']:.2f}x) | "
            f"{form['peak_rss_bytes'] / 2**20:,.0f} MiB | " + " | ".join(agree) + " |"
        )
    w8a8 = next((f for f in result["forms"] if f["label"].startswith("W8A8")), None)
    if w8a8 is not None:
        r = w8a8[f"ratios_vs_{base}"]
        verdicts = [
            f"decode {r['decode']:.2f}x (target ≥ {TARGETS['decode']}x: {'met' if r['decode'] >= TARGETS['decode'] else 'missed'})",
            f"prefill {r['prefill']:.2f}x (target ≥ {TARGETS['prefill']}x: {'met' if r['prefill'] >= TARGETS['prefill'] else 'missed'})",
            f"weights {r['weights']:.2f}x (target ≤ {TARGETS['weights']}x: {'met' if r['weights'] <= TARGETS['weights'] else 'missed'})",
        ]
        lines += ["", "W8A8 against fp32: " + "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="quantize the checkpoints again")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from datetime import datetime, timezone

    from squeeze.bench import commit, replace_section

    folders = [build(name, options, args.calib_samples, args.rebuild) for name, options in CHECKPOINTS.items()]
    json_file = WORK / "bench-infer.json"
    json_file.unlink(missing_ok=True)
    command = SQUEEZE + ["bench-infer", "smollm2", *sum((["--compare", str(f)] for f in folders), []),
                         "--repeats", str(args.repeats), "--out", str(json_file)]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "COLUMNS": "200"})
    result = json.loads(json_file.read_text())
    result["measured"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["commit"] = commit(REPO)
    for form in result["forms"]:
        form["spec"] = os.path.relpath(form["spec"], REPO) if os.path.isabs(form["spec"]) else form["spec"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    with HISTORY.open("a") as history:
        history.write(json.dumps(result) + "\n")
    replace_section(BENCH / "README.md", "infer", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
