"""Data-parallel calibration: two processes of one thread against one process of two threads.

    python benchmarks/data_parallel.py [--calib-samples 32] [--eval-tokens 4096] [--processes 2]

SmolLM2-135M, GPTQ W4 group-64 (symmetric), calibrated on ``--calib-samples`` x 512 Wikipedia
tokens and evaluated on ``--eval-tokens`` held-out ones. The same command runs twice, each a fresh
process tree on an otherwise idle machine: as one process with ``OMP_NUM_THREADS`` = the core
count, and under ``torchrun --nproc-per-node N`` with the cores split among the processes (the
honest CPU comparison: the same cores either way); and as one process of one thread, the control
for the codes: a different thread count sums floats in another order, as N processes do. The
table gives each run's stage times from its report, the ratios, the scores, and how many of the
4-bit codes the N-process and one-thread runs share with the first. Results go to
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


def run(processes: int, threads: int, args: argparse.Namespace) -> tuple[dict, Path]:
    """One run of the pass; its report's figures and the output folder."""
    out = WORK / f"data-parallel-{processes}x{threads}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        "-m", "squeeze.cli", "quantize", "smollm2", "--out", str(out), *SCHEME, "--calib-samples", str(args.calib_samples),
        "--eval-tokens", str(args.eval_tokens), "--json", "--quiet",
    ]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-3:]}")
    report = json.loads((out / "report.json").read_text())
    timings = {k: round(v, 1) for k, v in report["timings_s"].items() if k != "total"}
    return {
        "processes": processes, "threads_per_process": threads, "wall_s": round(wall, 1), "timings_s": timings,
        "per_process": report["settings"].get("per_process", ""),
        "perplexity": report["accuracy"]["perplexity_after"], "kl_divergence": report["accuracy"]["kl_divergence"],
        "top1_agreement": report["accuracy"]["top1_agreement"], "peak_rss_bytes": report["peak_rss_bytes"],
    }, out


def codes(folder: Path) -> dict[str, torch.Tensor]:
    """The 4-bit codes of a compressed-tensors W4 checkpoint, unpacked (eight to an int32)."""
    packed = {n: t for f in sorted(folder.glob("*.safetensors")) for n, t in load_file(f).items() if n.endswith("weight_packed")}
    return {n: torch.stack([(t >> (4 * i)) & 0xF for i in range(8)], dim=-1) for n, t in packed.items()}


def identical_codes(a: Path, b: Path) -> tuple[float, list[float]]:
    """The share of the 4-bit codes equal in the two checkpoints: overall, and per block in order."""
    one, two = codes(a), codes(b)
    blocks: dict[int, list[int]] = {}
    for name in one:
        index = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else -1
        tally = blocks.setdefault(index, [0, 0])
        tally[0] += int((one[name] == two[name]).sum())
        tally[1] += one[name].numel()
    same, total = sum(t[0] for t in blocks.values()), sum(t[1] for t in blocks.values())
    return same / max(total, 1), [round(blocks[i][0] / blocks[i][1], 4) for i in sorted(blocks) if i >= 0]


def table(result: dict) -> str:
    one, single, many = result["rows"]
    m = result["machine"]
    lines = [
        f"SmolLM2-135M, GPTQ W4 group-64 symmetric, {result['calib_samples']} x 512 Wikipedia calibration tokens, "
        f"evaluated on {result['eval_tokens']} held-out tokens. Each run a fresh process tree, one after the other, nothing else running.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM; torch {m['torch']}, transformers "
        f"{m['transformers']}. Run {m['date']}, squeeze {result['squeeze_source']}.",
        "",
        "| run | calibrate s | quantize s | load + evaluate + write s | wall s | perplexity | KL | top-1 | peak RSS per process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (one, single, many):
        t = r["timings_s"]
        rest = sum(v for k, v in t.items() if k not in ("calibrate", "quantize"))
        lines.append(
            f"| {r['processes']} process(es) x {r['threads_per_process']} thread(s) | {t.get('calibrate', 0):.1f} | "
            f"{t.get('quantize', 0):.1f} | {rest:.1f} | {r['wall_s']:.0f} | {r['perplexity']:.4f} | {r['kl_divergence']:.5f} | "
            f"{r['top1_agreement']:.2%} | {r['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )

    def ratio(key: str, base: dict) -> float:
        return many["timings_s"].get(key, 0) / max(base["timings_s"].get(key, 0), 1e-9)

    same = result["identical_codes"]
    lines += [
        "",
        f"{many['processes']} processes ÷ 1 process of {one['threads_per_process']} threads (the same cores): calibrate "
        f"{ratio('calibrate', one):.2f}x, quantize (the solves) {ratio('quantize', one):.2f}x, wall {many['wall_s'] / one['wall_s']:.2f}x. "
        f"÷ 1 process of 1 thread: calibrate {ratio('calibrate', single):.2f}x, quantize {ratio('quantize', single):.2f}x.",
        "",
        f"Identical 4-bit codes, against the 1 x {one['threads_per_process']} run: {many['processes']} processes "
        f"{same['processes']:.2%}, 1 process of 1 thread {same['threads']:.2%} (block 0: {same['processes_per_block'][0]:.2%} and "
        f"{same['threads_per_block'][0]:.2%}; last block: {same['processes_per_block'][-1]:.2%} and {same['threads_per_block'][-1]:.2%}).",
        "",
        f"Per process ({many['processes']} processes): {many['per_process']}.",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=32)
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
    # one process with every core; one with a single thread (the float summation order changes
    # with the thread count, which is what the codes of the other runs are held against); N processes
    runs = [run(1, cores, args), run(1, 1, args), run(args.processes, max(cores // args.processes, 1), args)]
    (one, one_out), (single, single_out), (many, many_out) = runs
    result = {
        "machine": machine(), "squeeze_source": source, "calib_samples": args.calib_samples,
        "eval_tokens": args.eval_tokens, "rows": [one, single, many], "identical_codes": {},
    }
    for key, out in (("processes", many_out), ("threads", single_out)):
        result["identical_codes"][key], result["identical_codes"][f"{key}_per_block"] = identical_codes(one_out, out)
    if args.note:
        result["note"] = args.note
    for _, out in runs:
        shutil.rmtree(out, ignore_errors=True)
    publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
