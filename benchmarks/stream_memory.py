"""Peak memory of quantization against model depth: the resident pass beside ``--stream``.

    python benchmarks/stream_memory.py [--depths 4 8 16] [--hidden 2048] [--intermediate 5632]

For each depth, a random-weight Llama of that many blocks (``synthetic_model.py``: bf16 shards,
SmolLM2's tokenizer) is made once under benchmarks/work/, then quantized RTN W4 group-128
(asymmetric, every Linear but lm_head, float32 compute, no evaluation) twice, each in a fresh
``squeeze quantize`` process: whole model in memory, and ``--stream``. The peak RSS and seconds
come from each run's report; both runs' tensors are compared by sha256. Random weights: memory and
time only. Results go to benchmarks/results/stream_memory.json and to the table between the
``stream_memory`` markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from quantize_rtn import BENCH, WORK, machine, publish, run_line, snapshot_for_children

NAME = "stream_memory"
RESULTS = BENCH / "results" / f"{NAME}.json"
QUANTIZE = ["--method", "rtn", "--bits", "4", "--mode", "per-group", "--group-size", "128", "--asym", "--no-eval", "--json", "--quiet"]


def model_folder(depth: int, hidden: int, intermediate: int) -> Path:
    folder = WORK / f"synthetic-llama-{depth}x{hidden}"
    if not folder.exists():
        subprocess.run(
            [sys.executable, str(BENCH / "synthetic_model.py"), str(folder), "--layers", str(depth), "--hidden", str(hidden),
             "--intermediate", str(intermediate), "--heads", str(hidden // 128), "--kv-heads", str(hidden // 256),
             "--max-shard-size", "1GB"],
            check=True,
        )
    return folder


def quantize(model: Path, out: Path, stream: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "squeeze.cli", "quantize", str(model), "--out", str(out), *QUANTIZE, *(["--stream"] if stream else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout)
    return {"peak_rss_bytes": report["peak_rss_bytes"], "seconds": sum(report["timings_s"].values()) - report["timings_s"].get("total", 0)}


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                out[key] = hashlib.sha256(handle.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def table(result: dict) -> str:
    lines = [
        "Random-weight Llama models (bf16 shards, SmolLM2's vocabulary, untied head), hidden "
        f"{result['hidden']}, MLP {result['intermediate']}; RTN W4 group-128 asym, float32 compute, no evaluation; "
        "each run a fresh `squeeze quantize` process, peak RSS from its report.",
        "",
        run_line(result),
        "",
        "| blocks | parameters | bf16 on disk | resident peak RSS | streamed peak RSS | streamed ÷ resident | resident s | streamed s | same tensors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['blocks']} | {r['parameters'] / 1e9:.2f} B | {r['disk_bytes'] / 1e9:.2f} GB | "
            f"{r['resident']['peak_rss_bytes'] / 2**30:.2f} GiB | {r['streamed']['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['streamed']['peak_rss_bytes'] / r['resident']['peak_rss_bytes']:.2f}x | {r['resident']['seconds']:.1f} | "
            f"{r['streamed']['seconds']:.1f} | {'yes' if r['same_tensors'] else '**no**'} |"
        )
    rows = result["rows"]
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = last["streamed"]["peak_rss_bytes"] / first["streamed"]["peak_rss_bytes"] - 1
        lines += ["", f"Streamed peak at {last['blocks']} blocks is {growth:+.0%} of the peak at {first['blocks']} blocks "
                  "(the part outside the blocks, embeddings and head, is the largest single part held)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    args = parser.parse_args()
    source = snapshot_for_children()
    rows = []
    for depth in args.depths:
        model = model_folder(depth, args.hidden, args.intermediate)
        index = json.loads((model / "model.safetensors.index.json").read_text())
        disk = index["metadata"]["total_size"]
        resident = quantize(model, WORK / "stream-resident", stream=False)
        streamed = quantize(model, WORK / "stream-streamed", stream=True)
        same = digests(WORK / "stream-resident") == digests(WORK / "stream-streamed")
        rows.append({"blocks": depth, "parameters": disk // 2, "disk_bytes": disk, "resident": resident, "streamed": streamed, "same_tensors": same})
        print(json.dumps(rows[-1]), flush=True)
    for out in ("stream-resident", "stream-streamed"):
        shutil.rmtree(WORK / out, ignore_errors=True)
    result = {"benchmark": NAME, "hidden": args.hidden, "intermediate": args.intermediate, "squeeze_source": source,
              "machine": machine(), "rows": rows}
    publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
