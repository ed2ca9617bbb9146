"""Peak memory of ``squeeze eval`` on a quantized model against its original: held whole, and streamed.

    python benchmarks/stream_eval.py [--depth 32] [--hidden 2048] [--intermediate 5632] [--eval-tokens 4096]

A random-weight Llama of ``--depth`` blocks (``synthetic_model.py``: bf16 shards, SmolLM2's
tokenizer; the 32 x 2048 model of ``stream_depth.py`` by default, 1.7 B parameters) is quantized
once, W4 group-128 asym with ``squeeze quantize --stream --no-eval`` (compressed-tensors
pack-quantized). Then ``squeeze eval OUTPUT --reference MODEL`` runs twice, each in a fresh process:
both models held whole, and ``--stream`` (one block of one model at a time, the quantized layers
unpacked block by block). Peak RSS, seconds and the scores come from each run's JSON; the two runs'
scores must agree to 1e-5 (random weights: the scores mean nothing else). Results go to
benchmarks/results/stream_eval.json and to the table between the ``stream_eval`` markers of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from quantize_rtn import BENCH, WORK, machine, publish, run_line, snapshot_for_children
from stream_memory import model_folder

NAME = "stream_eval"
RESULTS = BENCH / "results" / f"{NAME}.json"
SCHEME = ["--bits", "4", "--mode", "per-group", "--group-size", "128", "--asym"]
SCORES = ("perplexity_after", "perplexity_before", "kl_divergence", "top1_agreement")


def quantized(model: Path) -> Path:
    out = WORK / f"stream-eval-{model.name}-w4g128"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "squeeze.cli", "quantize", str(model), "--out", str(out), *SCHEME, "--stream", "--no-eval", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return out


def evaluate(output: Path, model: Path, stream: bool, eval_tokens: int) -> dict:
    cmd = [
        sys.executable, "-m", "squeeze.cli", "eval", str(output), "--reference", str(model), "--data", "wikipedia", "--eval-tokens",
        str(eval_tokens), "--seq-len", "512", "--generation-prompts", "0", "--json", "--quiet", *(["--stream"] if stream else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout)
    row = report["rows"][0]
    return {
        "stream": stream, "peak_rss_bytes": report["peak_rss_bytes"], "seconds": report["seconds"], "notes": report["notes"],
        "eval_tokens": row["tokens"], **{score: row[score] for score in SCORES},
    }


def table(result: dict) -> str:
    held, streamed = result["rows"]
    lines = [
        f"A random-weight Llama of {result['blocks']} blocks (hidden {result['hidden']}, MLP {result['intermediate']}, "
        f"{result['parameters'] / 1e9:.2f} B parameters, {result['disk_bytes'] / 1e9:.2f} GB of bf16 shards), quantized W4 group-128 asym "
        f"by `squeeze quantize --stream` ({result['quantized_bytes'] / 1e9:.2f} GB compressed-tensors), then `squeeze eval OUTPUT "
        f"--reference MODEL` on {held['eval_tokens']:,} Wikipedia tokens, float32 compute, without generation agreement. Each run a "
        "fresh process; peak RSS from its JSON.",
        "",
        run_line(result),
        "",
        "| eval | peak RSS | seconds | perplexity | reference perplexity | KL | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {'`--stream`' if r['stream'] else 'held whole'} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['seconds']:.0f} | "
            f"{r['perplexity_after']:.3f} | {r['perplexity_before']:.3f} | {r['kl_divergence']:.5f} | {100 * r['top1_agreement']:.2f}% |"
        )
    same = all(abs(streamed[s] - held[s]) <= 1e-5 * max(abs(held[s]), 1e-2) for s in SCORES)
    lines += [
        "",
        f"Streamed ÷ held: peak RSS {streamed['peak_rss_bytes'] / held['peak_rss_bytes']:.2f}x, time "
        f"{streamed['seconds'] / held['seconds']:.2f}x; scores {'the same to 1e-5' if same else '**differ**'}.",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--note", help="A line under the table (e.g. what else ran on the machine).")
    args = parser.parse_args()
    source = snapshot_for_children(WORK / "squeeze-src-stream-eval")  # its own: another benchmark may run beside it
    model = model_folder(args.depth, args.hidden, args.intermediate)
    disk = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    output = quantized(model)
    quantized_bytes = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    rows = [evaluate(output, model, stream, args.eval_tokens) for stream in (False, True)]
    shutil.rmtree(output, ignore_errors=True)
    result = {
        "benchmark": NAME, "blocks": args.depth, "hidden": args.hidden, "intermediate": args.intermediate, "parameters": disk // 2,
        "disk_bytes": disk, "quantized_bytes": quantized_bytes, "squeeze_source": source, "machine": machine(), "rows": rows,
        "note": args.note,
    }
    publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
