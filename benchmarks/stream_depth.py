"""Peak memory of streamed passes against model depth, evaluation and calibration included.

    python benchmarks/stream_depth.py [--depths 8 16 32] [--methods rtn gptq] [--calib-samples 32] [--eval-tokens 4096]
    python benchmarks/stream_depth.py --big rtn [gptq]
    python benchmarks/stream_depth.py --depths 32 --methods gptq --keep --method-args "--damp-percent 0.01 ..."

For each depth, a random-weight Llama of that many blocks (``synthetic_model.py``: bf16 shards,
SmolLM2's tokenizer, hidden 2048, MLP 5632) is quantized W4 group-128 (asymmetric, every Linear
but lm_head, float32 compute) with ``squeeze quantize --stream``, each run in a fresh process:
RTN, and GPTQ on ``--calib-samples`` x 512 calibration tokens; both evaluated on
``--eval-tokens`` Wikipedia tokens against the input. Peak RSS, stage times and the streamed
report's part count come from each run's report. Random weights: memory and time only (their
perplexities mean nothing). ``--big METHOD...`` instead runs those methods, the same way, on an
8B-parameter model of Llama-3-8B's shapes (32 blocks, hidden 4096, MLP 14336, 8 KV heads, ~15 GB
in bf16; the target: peak RSS at most 8 GiB), keeping the depth rows already measured. ``--keep``
keeps the depth rows of earlier runs that this run does not measure again (each row records its
run); ``--method-args`` adds options to every ``squeeze quantize`` of this run (recorded in its
rows and shown in the table), e.g. to pin the GPTQ settings earlier rows ran with. Results go to
benchmarks/results/stream_depth.json and to the table between the ``stream_depth`` markers of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from quantize_rtn import BENCH, WORK, machine, publish, run_line, snapshot_for_children
from stream_memory import model_folder

from squeeze.memory import PassShape, resident_bytes, streamed_bytes
from squeeze.quant.methods import METHODS

NAME = "stream_depth"
RESULTS = BENCH / "results" / f"{NAME}.json"
SCHEME = ["--bits", "4", "--mode", "per-group", "--group-size", "128", "--asym"]


def run(model: Path, method: str, args: argparse.Namespace) -> dict:
    out = WORK / f"stream-depth-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "squeeze.cli", "quantize", str(model), "--out", str(out), "--method", method, *SCHEME, "--stream",
        "--eval-tokens", str(args.eval_tokens), "--seq-len", "512", "--calib-samples", str(args.calib_samples), "--json", "--quiet",
        *shlex.split(args.method_args),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout)
    timings = {k: v for k, v in report["timings_s"].items() if k != "total"}
    return {
        "peak_rss_bytes": report["peak_rss_bytes"], "estimate_bytes": report["memory_estimate_bytes"],
        "seconds": sum(timings.values()), "timings_s": timings,
        "kl_divergence": report["accuracy"]["kl_divergence"], "eval_tokens": report["accuracy"]["tokens"],
        "calibration_tokens": report["settings"]["calibration_tokens"], "method_args": args.method_args,
        "generation": generation_mode(report), "peak_stage": report.get("peak_rss_stage", ""),
    }


def generation_mode(report: dict) -> str:
    """How the pass scored generation agreement, from its notes: streamed, whole models, or not at all."""
    notes = " ".join(report.get("notes", []))
    if "one block at a time for every new token" in notes:
        return "streamed"
    return "whole models" if "generate" in report["timings_s"] else "none"


def generation_column(row: dict) -> str:
    """A row's generation agreement; older rows did not record it, and ran it only if they timed it."""
    return row.get("generation") or ("not recorded" if "generate" in row["timings_s"] else "none")


# real shapes the estimate is shown for beside the measured rows: (name, blocks, hidden, MLP, heads, kv heads, vocab, tied head)
SHAPES = (("Llama-3.2-1B", 16, 2048, 8192, 32, 8, 128256, True), ("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
          ("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256, False))


BIG = {"blocks": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8}
BIG_TARGET = 8 * 2**30


def big_model() -> Path:
    """The 8B-parameter random-weight model, made once (about one shard of memory, 15 GB of disk)."""
    folder = WORK / "synthetic-llama-8b"
    if not folder.exists():
        subprocess.run(
            [sys.executable, str(BENCH / "synthetic_model.py"), str(folder), "--layers", str(BIG["blocks"]), "--hidden", str(BIG["hidden"]),
             "--intermediate", str(BIG["intermediate"]), "--heads", str(BIG["heads"]), "--kv-heads", str(BIG["kv_heads"]),
             "--max-shard-size", "2GB"],
            check=True,
        )
    return folder


def estimates(args: argparse.Namespace) -> list[dict]:
    """squeeze.memory's streamed estimate (the one --memory-budget checks) for real shapes, GPTQ and RTN, fp32 and bf16 compute."""
    rows = []
    for name, blocks, hidden, mlp, heads, kv, vocab, tied in SHAPES:
        config = transformers.LlamaConfig(
            num_hidden_layers=blocks, hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv,
            vocab_size=vocab, tie_word_embeddings=tied,
        )
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        row = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
        whole = PassShape(True, 0, 0, args.eval_tokens, 512, True, False, 4)
        row["rtn_fp32_whole"] = resident_bytes(model, model, whole)
        for method in ("rtn", "gptq"):
            for dtype_bytes in (4, 2):
                tokens = args.calib_samples * 512 if method == "gptq" else 0
                shape = PassShape(True, METHODS.get(method).calibration_bytes(model, tokens, dtype_bytes) if tokens else 0, tokens,
                                  args.eval_tokens, 512, True, False, dtype_bytes)
                row[f"{method}_{'fp32' if dtype_bytes == 4 else 'bf16'}"] = streamed_bytes(model, model, shape)
        rows.append(row)
    return rows


def run_of(result: dict) -> str:
    return f"{result['machine']['date']}, squeeze {result['squeeze_source']}"


def table(result: dict) -> str:
    lines = [
        f"Random-weight Llama models (bf16 shards, SmolLM2's vocabulary, untied head), hidden {result['hidden']}, MLP "
        f"{result['intermediate']}; `squeeze quantize --stream`, W4 group-128 asym, float32 compute, evaluated on "
        f"{result['eval_tokens']} Wikipedia tokens; GPTQ calibrated on {result['calib_samples']} x 512 tokens. Each run a fresh "
        "process, peak RSS from its report.",
        "",
        run_line(result),
        "",
        "| method | blocks | parameters | bf16 on disk | peak RSS | vs first depth | peak reached while | generation agreement "
        "| estimated before loading | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in result["methods"]:
        rows = [r for r in result["rows"] if r["method"] == method]
        for r in rows:
            lines.append(
                f"| {method} | {r['blocks']} | {r['parameters'] / 1e9:.2f} B | {r['disk_bytes'] / 1e9:.2f} GB | "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_rss_bytes'] / rows[0]['peak_rss_bytes']:.2f}x | "
                f"{r.get('peak_stage') or 'not recorded'} | {generation_column(r)} | {r['estimate_bytes'] / 2**30:.2f} GiB | {r['seconds']:.0f} |"
            )
    pinned = sorted({(r["method"], r["method_args"]) for r in result["rows"] if r.get("method_args")})
    kept = [r for r in result["rows"] if r.get("run") and r["run"] != run_of(result)]
    if pinned or kept:
        lines.append("")
    for method, extra in pinned:
        depths = ", ".join(str(r["blocks"]) for r in result["rows"] if r["method"] == method and r.get("method_args") == extra)
        lines.append(f"{method} at {depths} blocks ran with `{extra}`.")
    for run in dict.fromkeys(r["run"] for r in kept):
        which = "; ".join(
            f"{m} at {', '.join(str(r['blocks']) for r in kept if r['run'] == run and r['method'] == m)} blocks"
            for m in dict.fromkeys(r["method"] for r in kept if r["run"] == run)
        )
        lines.append(f"Kept from the run of {run}: {which}.")
    lines += [
        "", "The estimate `--memory-budget` checks, for real shapes (squeeze.memory, streamed, same text; not measured here):", "",
        "| model | parameters | RTN fp32, held whole | RTN fp32 | RTN bf16 | GPTQ fp32 | GPTQ bf16 |", "|---|---|---|---|---|---|---|",
    ]
    for e in result["estimates"]:
        lines.append(
            f"| {e['model']} | {e['parameters'] / 1e9:.1f} B | {e['rtn_fp32_whole'] / 2**30:.1f} GiB | {e['rtn_fp32'] / 2**30:.1f} GiB | "
            f"{e['rtn_bf16'] / 2**30:.1f} GiB | {e['gptq_fp32'] / 2**30:.1f} GiB | {e['gptq_bf16'] / 2**30:.1f} GiB |"
        )
    big = result.get("big_rows", [])
    if big:
        lines += [
            "", f"Bigger than comfortable: Llama-3-8B's shapes ({BIG['blocks']} blocks, hidden {BIG['hidden']}, MLP {BIG['intermediate']}, "
            f"{BIG['kv_heads']} KV heads, SmolLM2's vocabulary), same settings:", "",
            "| method | parameters | bf16 on disk | peak RSS | estimated before loading | seconds | run |", "|---|---|---|---|---|---|---|",
        ]
        for r in big:
            lines.append(
                f"| {r['method']} | {r['parameters'] / 1e9:.2f} B | {r['disk_bytes'] / 1e9:.1f} GB | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                f"{r['estimate_bytes'] / 2**30:.2f} GiB | {r['seconds']:.0f} | {r['date']}, squeeze {r['squeeze_source']} |"
            )
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    deepest = max(r["blocks"] for r in result["rows"])
    for method in result["methods"]:
        rows = [r for r in result["rows"] if r["method"] == method]
        if len(rows) > 1:
            growth = rows[-1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"] - 1
            verdict = "pass" if growth <= 0.15 else "**FAIL**"
            if rows[-1]["blocks"] < deepest:
                verdict = f"**not measured** at {deepest} blocks ({verdict} at {rows[-1]['blocks']})"
            lines.append(
                f"| {method}: peak at {deepest} blocks within 15% of the peak at {rows[0]['blocks']} | "
                f"{growth:+.1%} at {rows[-1]['blocks']} blocks | {verdict} |"
            )
    for r in big:
        verdict = "pass" if r["peak_rss_bytes"] <= BIG_TARGET else "**FAIL**"
        lines.append(f"| {r['method']}: 8B model with evaluation, peak RSS at most 8 GiB | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {verdict} |")
    for method in result.get("big_not_run", []):
        lines.append(f"| {method}: 8B model with evaluation, peak RSS at most 8 GiB | not run | **not measured** |")
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--big", nargs="+", metavar="METHOD", help="Run these methods on the 8B-parameter model instead of the depths.")
    parser.add_argument("--table-only", action="store_true", help="Rewrite the README table from the last results (estimates made anew).")
    parser.add_argument("--note", help="With --table-only: a line under the table (e.g. what else ran on the machine).")
    parser.add_argument("--keep", action="store_true", help="Keep the earlier depth rows this run does not measure again.")
    parser.add_argument("--method-args", default="", help="Options added to every squeeze quantize of this run (one string).")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(RESULTS.read_text())
        result["estimates"] = estimates(args)
        if args.note:
            result["note"] = args.note
        publish(result, RESULTS, table(result), NAME)
        return
    source = snapshot_for_children()
    if args.big:
        result = json.loads(RESULTS.read_text())
        model = big_model()
        disk = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        big = [r for r in result.get("big_rows", []) if r["method"] not in args.big]
        result["big_rows"] = big
        for method in args.big:
            big.append({"method": method, "parameters": disk // 2, "disk_bytes": disk, "squeeze_source": source,
                        "date": machine()["date"], **run(model, method, args)})
            print(json.dumps(big[-1]), flush=True)
            result["big_not_run"] = [m for m in ("rtn", "gptq") if m not in {r["method"] for r in big}]
            publish(result, RESULTS, table(result), NAME)
        return
    earlier = json.loads(RESULTS.read_text()) if args.keep and RESULTS.exists() else None
    rows: list[dict] = []
    result = {
        "benchmark": NAME, "hidden": args.hidden, "intermediate": args.intermediate, "calib_samples": args.calib_samples,
        "eval_tokens": args.eval_tokens, "methods": args.methods, "squeeze_source": source, "machine": machine(), "rows": rows,
        "estimates": estimates(args),
    }
    if earlier is not None:
        old_run = run_of(earlier)
        redo = {(m, d) for m in args.methods for d in args.depths}
        rows += [{"run": old_run, **r} for r in earlier["rows"] if (r["method"], r["blocks"]) not in redo]
        result["methods"] = list(dict.fromkeys([*earlier["methods"], *args.methods]))
        for key in ("big_rows", "big_not_run", "note"):
            if key in earlier:
                result[key] = earlier[key]
    order = {m: i for i, m in enumerate(result["methods"])}
    for method in args.methods:
        for depth in args.depths:
            model = model_folder(depth, args.hidden, args.intermediate)
            disk = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
            row = {"method": method, "blocks": depth, "parameters": disk // 2, "disk_bytes": disk, "run": run_of(result),
                   **run(model, method, args)}
            rows.append(row)
            rows.sort(key=lambda r: (order[r["method"]], r["blocks"]))
            print(json.dumps(row), flush=True)
            publish(result, RESULTS, table(result), NAME)  # after every row: a long run interrupted keeps what it measured


if __name__ == "__main__":
    main()
