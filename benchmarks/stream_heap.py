"""Does the memory of a streamed pass grow block after block? glibc's default heap beside the
fixed mmap threshold squeeze sets (squeeze.stream.lazy.map_large_allocations).

    python benchmarks/stream_heap.py [--depth 16] [--hidden 1024] [--intermediate 2816]

A random-weight Llama of ``--depth`` blocks (``synthetic_model.py``) is quantized GPTQ W4 group-128
asym with ``--stream`` (float32 compute, evaluation on, no generation), twice, each in a fresh
process that samples its own RSS every 50 ms and books each sample to the block being read at
the time: once as squeeze runs, once with the threshold left to glibc (its default, raised each
time a mapped block is freed). The quantize pass reads every block once after the evaluation's
reference has read them all; the table gives that pass's highest RSS while each block was the
latest read (the first, the range over the middle ones, the last: the evaluation's head comes after
it), and the run's peak from its report. ``--table-only`` rewrites the table from the last results. Results go to
benchmarks/results/stream_heap.json and to the table between the ``stream_heap`` markers of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from quantize_rtn import BENCH, WORK, machine, publish, run_line, snapshot_for_children
from stream_memory import model_folder

NAME = "stream_heap"
RESULTS = BENCH / "results" / f"{NAME}.json"
SNAPSHOT = WORK / "squeeze-src-stream-heap"  # its own: another benchmark may be running from the default one
MODES = {"fixed": "squeeze (threshold fixed at 4 MiB)", "glibc": "glibc's default (threshold rises as mapped blocks are freed)"}


def child(mode: str, trace: Path, argv: list[str]) -> None:
    """Run ``squeeze`` with ``argv`` in this process, booking RSS samples to blocks into ``trace``."""
    from squeeze.cli import app  # here: the parent only starts children
    from squeeze.stream import lazy

    if mode == "glibc":
        lazy._MALLOPT = None  # the one call that fixes the threshold does nothing
    page = os.sysconf("SC_PAGE_SIZE")
    reads: list[int] = []  # the highest RSS while each block read was the latest, in read order
    current = [-1]

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            if current[0] >= 0:
                reads[current[0]] = max(reads[current[0]], rss)
            time.sleep(0.05)

    block = lazy.LazyModel.block

    def booked(self, index: int):
        reads.append(0)
        current[0] = len(reads) - 1
        return block(self, index)

    lazy.LazyModel.block = booked
    threading.Thread(target=sample, daemon=True).start()
    sys.argv = ["squeeze", *argv]
    try:
        app()
    finally:
        trace.write_text(json.dumps(reads))


def run(model: Path, mode: str, args: argparse.Namespace) -> dict:
    out, trace = WORK / f"stream-heap-{mode}", WORK / f"stream-heap-{mode}.json"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, __file__, "--child", mode, str(trace), "quantize", str(model), "--out", str(out), "--method", "gptq",
        "--bits", "4", "--mode", "per-group", "--group-size", "128", "--asym", "--stream", "--eval-tokens", str(args.eval_tokens),
        "--seq-len", "512", "--calib-samples", str(args.calib_samples), "--generation-prompts", "0", "--json", "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout)
    reads = json.loads(trace.read_text())
    trace.unlink()
    timings = {k: v for k, v in report["timings_s"].items() if k != "total"}
    return {
        "mode": mode, "peak_rss_bytes": report["peak_rss_bytes"], "peak_stage": report.get("peak_rss_stage", ""),
        "quantize_pass_bytes": reads[-args.depth:], "seconds": sum(timings.values()), "timings_s": timings,
        "kl_divergence": report["accuracy"]["kl_divergence"],
    }


def table(result: dict) -> str:
    lines = [
        f"A random-weight Llama of {result['depth']} blocks (hidden {result['hidden']}, MLP {result['intermediate']}, bf16 shards), "
        f"`squeeze quantize --stream`, GPTQ W4 group-128 asym, calibrated on {result['calib_samples']} x 512 tokens, "
        f"evaluated on {result['eval_tokens']} Wikipedia tokens, no generation; each run a fresh process.",
        "",
        run_line(result),
        "",
        "| heap | quantize pass: block 1 | blocks 2 to N-1, lowest to highest | last block (the head after it) | run peak RSS | peak reached while | seconds | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        blocks = r["quantize_pass_bytes"]
        middle = blocks[1:-1] or blocks[:1]
        lines.append(
            f"| {MODES[r['mode']]} | {blocks[0] / 2**30:.3f} GiB | {min(middle) / 2**30:.3f} to {max(middle) / 2**30:.3f} GiB | "
            f"{blocks[-1] / 2**30:.3f} GiB | {r['peak_rss_bytes'] / 2**30:.3f} GiB | {r['peak_stage']} | {r['seconds']:.0f} | "
            f"{r['kl_divergence']:.6f} |"
        )
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--note", default="", help="A line under the table (e.g. what else ran on the machine).")
    parser.add_argument("--table-only", action="store_true", help="Rewrite the README table from the last results.")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(RESULTS.read_text())
        result["note"] = args.note or result.get("note", "")
        publish(result, RESULTS, table(result), NAME)
        return
    source = snapshot_for_children(SNAPSHOT)
    model = model_folder(args.depth, args.hidden, args.intermediate)
    rows = []
    for mode in MODES:
        rows.append(run(model, mode, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "quantize_pass_bytes"}), flush=True)
    result = {
        "benchmark": NAME, "depth": args.depth, "hidden": args.hidden, "intermediate": args.intermediate,
        "calib_samples": args.calib_samples, "eval_tokens": args.eval_tokens, "squeeze_source": source, "machine": machine(),
        "rows": rows, "note": args.note,
    }
    publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
