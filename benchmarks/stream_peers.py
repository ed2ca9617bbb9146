"""SmolLM2 held whole and streamed, GPTQ W4 g64 and Wanda 50%, beside the peers' peak memory.

    python benchmarks/stream_peers.py [--calib-samples 32] [--eval-tokens 4096] [--no-peers] [--only NAME ...]

SmolLM2 is the built-in (its Q4_1 GGUF dequantized to fp32, in squeeze's cache as a safetensors
folder). Each configuration runs twice in a fresh ``squeeze`` process, on the same calibration and evaluation windows as
``quantize_calibrated.py`` and ``prune.py``: held whole, and ``--stream``, both without generation
agreement (the peers score none; streamed, it would load the whole model after the pass). Peak RSS, seconds
(calibration and the pass's own work) and the scores come from each report. The peers
(llm-compressor, GPTQModel with its disk offload on) run the same configuration in the same
invocation, through ``quantize_calibrated.py`` and ``prune.py --only NAME --peers-only`` (their
venvs: ``benchmarks/peers/setup.sh``), which record them in benchmarks/results/*.json; with
``--no-peers`` their last recorded runs are used instead (the dates are in the table). Those peers'
runs score the result in memory beside an fp32 copy, which a streamed run does not hold; so
llm-compressor also runs GPTQ at its smallest memory, the model offloaded to disk and nothing
evaluated (``peers/llmcompressor_offload.py``, same recipe and rows), and the lowest of all peer
peaks is the one compared. ``--offload-peers-only`` runs just that and keeps the squeeze rows.
Results go to benchmarks/results/stream_peers.json and to the table between the
``stream_peers`` markers of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from quantize_rtn import BENCH, PEER_PYTHON, WORK, machine, publish, run_line, snapshot_for_children

NAME = "stream_peers"
RESULTS = BENCH / "results" / f"{NAME}.json"
CONFIGS = {
    "gptq-w4-g64": (["quantize", "--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "64"], "quantize_calibrated"),
    "wanda-50": (["prune", "--method", "wanda", "--sparsity", "0.5"], "prune"),
}
# peer runs at their smallest memory (disk offload, no evaluation), by configuration
OFFLOAD_PEERS = {"gptq-w4-g64": {"llm-compressor, disk offload": BENCH / "peers" / "llmcompressor_offload.py"}}


def run(name: str, stream: bool, args: argparse.Namespace) -> dict:
    command, _ = CONFIGS[name]
    out = WORK / f"stream-peers-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "squeeze.cli", command[0], "smollm2", *command[1:], "--out", str(out),
        "--calib-samples", str(args.calib_samples), "--eval-tokens", str(args.eval_tokens), "--seq-len", "512", "--json", "--quiet",
        "--generation-prompts", "0",
        *(["--stream"] if stream else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout)
    timings = report["timings_s"]
    accuracy = report["accuracy"]
    return {
        "peak_rss_bytes": report["peak_rss_bytes"], "estimate_bytes": report["memory_estimate_bytes"],
        "work_s": sum(v for k, v in timings.items() if k in ("calibrate", "quantize", "prune")),
        "wall_s": sum(v for k, v in timings.items() if k != "total"),
        "perplexity": accuracy["perplexity_after"], "kl_divergence": accuracy["kl_divergence"], "top1_agreement": accuracy["top1_agreement"],
    }


def run_peers(name: str, args: argparse.Namespace) -> None:
    """Run the peers on ``name`` through its own benchmark, which records them."""
    _, benchmark = CONFIGS[name]
    cmd = [sys.executable, str(BENCH / f"{benchmark}.py"), "--only", name, "--peers-only",
           "--calib-samples", str(args.calib_samples), "--eval-tokens", str(args.eval_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")


def run_offload_peers(name: str, args: argparse.Namespace) -> dict:
    """Each offloading peer of ``name`` in its own process: tool → its result row (peak RSS, how, when)."""
    found = {}
    for tool, script in OFFLOAD_PEERS.get(name, {}).items():
        out, result = WORK / f"stream-peers-offload-{name}", WORK / f"stream-peers-offload-{name}.json"
        shutil.rmtree(out, ignore_errors=True)
        result.unlink(missing_ok=True)
        cmd = [str(PEER_PYTHON), str(script), name, "--calib-samples", str(args.calib_samples), "--seq-len", "512",
               "--eval-tokens", str(args.eval_tokens), "--out", str(out), "--result", str(result)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parent)
        shutil.rmtree(out, ignore_errors=True)
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
        found[tool] = {**json.loads(result.read_text()), "date": machine()["date"]}
        print(f"{tool}: peak RSS {found[tool]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return found


def _all_peers(row: dict) -> dict[str, tuple[int, str]]:
    """Every peer peak of a row: tool → (bytes, date)."""
    peer = row["peers"]
    found = {tool: (rss, peer["date"]) for tool, rss in peer["peak_rss_bytes"].items()}
    found |= {tool: (r["peak_rss_bytes"], r["date"]) for tool, r in row.get("offload_peers", {}).items()}
    return found


def peers(name: str) -> dict:
    """The peers' peak RSS for ``name`` from the last run of its own benchmark."""
    _, benchmark = CONFIGS[name]
    recorded = json.loads((BENCH / "results" / f"{benchmark}.json").read_text())
    found = {}
    for row in recorded["rows"]:
        if (row.get("config") or row.get("name")) == name and row.get("tool") != "squeeze" and row.get("peak_rss_bytes"):
            found[row["tool"]] = row["peak_rss_bytes"]
    return {"benchmark": benchmark, "date": recorded["machine"]["date"], "peak_rss_bytes": found}


def table(result: dict) -> str:
    lines = [
        f"SmolLM2-135M (the built-in, fp32), {result['calib_samples']} x 512 calibration tokens, "
        f"{result['eval_tokens']} Wikipedia evaluation tokens; each run a fresh `squeeze` process. Peers' peak RSS from their "
        f"own benchmark's run {'in this invocation' if result.get('peers_ran') else 'last recorded'} (date beside it).",
        "",
        run_line(result),
        "",
        "| configuration | whole: peak RSS | streamed: peak RSS | estimated (streamed) | lowest peer peak RSS | streamed ÷ peer | KL whole | KL streamed | run s whole | run s streamed | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for r in result["rows"]:
        whole, streamed, every = r["whole"], r["streamed"], _all_peers(r)
        tool, (lowest, date) = min(every.items(), key=lambda kv: kv[1][0]) if every else ("-", (0, "-"))
        ratio = streamed["peak_rss_bytes"] / lowest if lowest else float("nan")
        time_ratio = streamed["wall_s"] / whole["wall_s"]
        lines.append(
            f"| {r['config']}{' (run ' + r['run'] + ')' if r.get('run') and len(result['rows']) > 1 else ''} | {whole['peak_rss_bytes'] / 2**30:.2f} GiB | {streamed['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{streamed['estimate_bytes'] / 2**30:.2f} GiB | {lowest / 2**30:.2f} GiB ({tool}, {date}) | {ratio:.2f}x | "
            f"{whole['kl_divergence']:.5f} | {streamed['kl_divergence']:.5f} | {whole['wall_s']:.0f} | {streamed['wall_s']:.0f} | {time_ratio:.2f}x |"
        )
        same = abs(streamed["kl_divergence"] - whole["kl_divergence"]) <= 1e-5 * max(whole["kl_divergence"], 1e-9)
        targets += [
            f"| {r['config']}: streamed peak RSS ≤ 0.5x the lowest peer's | {ratio:.2f}x | {'pass' if ratio <= 0.5 else '**FAIL**'} |",
            f"| {r['config']}: quality unchanged from the whole-model pass | KL {streamed['kl_divergence']:.6f} vs {whole['kl_divergence']:.6f} | {'pass' if same else '**FAIL**'} |",
            f"| {r['config']}: time within 1.1x of the whole-model pass (the whole run: load, compress, evaluate, write) | {time_ratio:.2f}x | {'pass' if time_ratio <= 1.1 else '**FAIL**'} |",
        ]
    lines += ["", "Every peer peak, by configuration (the lowest is compared above):", ""]
    for r in result["rows"]:
        for tool, (rss, date) in sorted(_all_peers(r).items(), key=lambda kv: kv[1][0]):
            how = r.get("offload_peers", {}).get(tool, {}).get("how") or f"its row in {r['peers']['benchmark']}.py (evaluation in memory beside an fp32 copy)"
            lines.append(f"- {r['config']}, {tool}: {rss / 2**30:.2f} GiB ({date}): {how}")
    lines += ["", "| target | measured | verdict |", "|---|---|---|", *targets]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="Run these configurations; keep the other rows measured before.")
    parser.add_argument("--no-peers", action="store_true", help="Use the peers' last recorded runs instead of running them.")
    parser.add_argument("--offload-peers-only", action="store_true",
                        help="Only run the peers at their smallest memory (disk offload) and merge them into the last results.")
    parser.add_argument("--table-only", action="store_true", help="Rewrite the README table from the last results.")
    parser.add_argument("--note", help="With --table-only: a line under the table (e.g. what else ran on the machine).")
    args = parser.parse_args()
    if args.table_only:
        result = json.loads(RESULTS.read_text())
        if args.note:
            result["note"] = args.note
        publish(result, RESULTS, table(result), NAME)
        return
    source = snapshot_for_children(WORK / "squeeze-src-stream-peers")  # its own: it may run beside another benchmark
    if args.offload_peers_only:
        result = json.loads(RESULTS.read_text())
        for row in result["rows"]:
            if row["config"] in OFFLOAD_PEERS and (not args.only or row["config"] in args.only):
                row["offload_peers"] = run_offload_peers(row["config"], args)
        publish(result, RESULTS, table(result), NAME)
        return
    kept, recorded = [], {}
    if RESULTS.exists():
        before = json.loads(RESULTS.read_text())
        recorded = {r["config"]: r.get("offload_peers", {}) for r in before["rows"]}
    if args.only and RESULTS.exists():
        kept = [r for r in before["rows"] if r["config"] not in args.only]
        for r in kept:
            r.setdefault("run", f"{before['machine']['date']}, squeeze {before['squeeze_source']}")
    rows: list[dict] = list(kept)
    result = {
        "benchmark": NAME, "calib_samples": args.calib_samples, "eval_tokens": args.eval_tokens, "squeeze_source": source,
        "machine": machine(), "rows": rows, "peers_ran": not args.no_peers,
    }
    for name in args.only or CONFIGS:
        if not args.no_peers:
            run_peers(name, args)
        row = {"config": name, "whole": run(name, False, args), "streamed": run(name, True, args), "peers": peers(name),
               "offload_peers": recorded.get(name, {}) if args.no_peers else run_offload_peers(name, args), "run": f"{machine()['date']}, squeeze {source}"}
        rows.append(row)
        rows.sort(key=lambda r: list(CONFIGS).index(r["config"]))
        print(json.dumps(row), flush=True)
        publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
