"""Data-parallel calibration: two processes of one thread against one process of two threads.

    python benchmarks/data_parallel.py [--calib-samples 128] [--eval-tokens 4096] [--processes 2]

SmolLM2-135M, GPTQ W4 group-64 (symmetric), calibrated on ``--calib-samples`` x 512 Wikipedia
tokens and evaluated on ``--eval-tokens`` held-out ones. The same command runs twice, each a fresh
process tree on an otherwise idle machine: as one process with ``OMP_NUM_THREADS`` = the core
count, and under ``torchrun --nproc-per-node N`` with the cores split among the processes (the
honest CPU comparison: the same cores either way). The table gives each run's stage times from its
report, the ratios, the scores, and how many of the written codes are identical. Results go to
benchmarks/results/data_parallel.json and to the table between the ``data_parallel`` markers of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from quantize_rtn import BENCH, WORK, machine, publish, snapshot_for_children
from safetensors.torch import load_file

NAME = "data_parallel"
RESULTS = BENCH / "results" / f"{NAME}.json"
SCHEME = ["--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "64"]


def run(processes: int, cores: int, args: argparse.Namespace) -> tuple[dict, Path]:
    """One run of the pass; its report's figures and the output folder."""
    out = WORK / f"data-parallel-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        "-m", "squeeze.cli", "quantize", "smollm2", "--out", str(out), *SCHEME, "--calib-samples", str(args.calib_samples),
        "--eval-tokens", str(args.eval_tokens), "--json", "--quiet",
    ]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // processes, 1))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-3:]}")
    report = json.loads((out / "report.json").read_text())
    timings = {k: round(v, 1) for k, v in report["timings_s"].items() if k != "total"}
    return {
        "processes": processes, "threads_per_process": max(cores // processes, 1), "wall_s": round(wall, 1), "timings_s": timings,
        "per_process": report["settings"].get("per_process", ""),
        "perplexity": report["accuracy"]["perplexity_after"], "kl_divergence": report["accuracy"]["kl_divergence"],
        "top1_agreement": report["accuracy"]["top1_agreement"], "peak_rss_bytes": report["peak_rss_bytes"],
    }, out


def identical_codes(a: Path, b: Path) -> float:
    """The share of integer tensor elements (the packed codes) equal in the two checkpoints."""
    one, two = (
        {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items()} for folder in (a, b)
    )
    same = sum(int((one[n] == two[n]).sum()) for n in one if not one[n].is_floating_point())
    total = sum(one[n].numel() for n in one if not one[n].is_floating_point())
    return same / max(total, 1)


def table(result: dict) -> str:
    one, many = result["rows"]
    m = result["machine"]
    lines = [
        f"SmolLM2-135M, GPTQ W4 group-64 symmetric, {result['calib_samples']} x 512 Wikipedia calibration tokens, "
        f"evaluated on {result['eval_tokens']} held-out tokens. Each run a fresh process tree, nothing else running.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM; torch {m['torch']}, transformers "
        f"{m['transformers']}. Run {m['date']}, squeeze {result['squeeze_source']}.",
        "",
        "| run | calibrate s | quantize s | load + evaluate + write s | wall s | perplexity | KL | top-1 | peak RSS per process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (one, many):
        t = r["timings_s"]
        rest = sum(v for k, v in t.items() if k not in ("calibrate", "quantize"))
        lines.append(
            f"| {r['processes']} process(es) x {r['threads_per_process']} thread(s) | {t.get('calibrate', 0):.1f} | "
            f"{t.get('quantize', 0):.1f} | {rest:.1f} | {r['wall_s']:.0f} | {r['perplexity']:.4f} | {r['kl_divergence']:.5f} | "
            f"{r['top1_agreement']:.2%} | {r['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    ratio = lambda key: many["timings_s"].get(key, 0) / max(one["timings_s"].get(key, 0), 1e-9)  # noqa: E731
    both = (many["timings_s"].get("calibrate", 0) + many["timings_s"].get("quantize", 0)) / max(
        one["timings_s"].get("calibrate", 0) + one["timings_s"].get("quantize", 0), 1e-9
    )
    lines += [
        "",
        f"{many['processes']} processes ÷ 1: calibrate {ratio('calibrate'):.2f}x, quantize (the solves) {ratio('quantize'):.2f}x, "
        f"calibrate + quantize {both:.2f}x, wall {many['wall_s'] / one['wall_s']:.2f}x. Identical written codes: "
        f"{result['identical_codes']:.4%}; perplexity {one['perplexity']:.4f} vs {many['perplexity']:.4f}.",
        "",
        f"Per process ({many['processes']} processes): {many['per_process']}.",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="Rewrite the README table from the last results.")
    parser.add_argument("--note", help="A line under the table.")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(RESULTS.read_text())
        if args.note:
            result["note"] = args.note
        publish(result, RESULTS, table(result), NAME)
        return
    source = snapshot_for_children()
    cores = os.cpu_count() or 1
    one, one_out = run(1, cores, args)
    many, many_out = run(args.processes, cores, args)
    result = {
        "machine": {**machine(), "torch": torch.__version__}, "squeeze_source": source, "calib_samples": args.calib_samples,
        "eval_tokens": args.eval_tokens, "rows": [one, many], "identical_codes": identical_codes(one_out, many_out),
    }
    if args.note:
        result["note"] = args.note
    for out in (one_out, many_out):
        shutil.rmtree(out, ignore_errors=True)
    publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
