"""Pruning SmolLM2 (magnitude, Wanda; 50% unstructured and 2:4; Wanda 2:4 then W4) next to llm-compressor.

    python benchmarks/prune.py [--calib-samples 32] [--eval-tokens 4096] [--only NAME ...] [--no-peers]

Every row prunes the same fp32 model; calibrated rows use the same token rows (squeeze's
``calibration_windows`` of the Wikipedia calibration split), and every row is scored on the same
evaluation windows of two texts (Wikipedia and BBC news) by squeeze's ``compare_causal`` against
the fp32 model. Each configuration runs in a fresh subprocess so peak RSS is its own: squeeze
through ``squeeze.api.prune`` (then ``squeeze.api.quantize`` for the combined rows), scored on the
checkpoint it wrote, reloaded; llm-compressor through ``benchmarks/peers/llmcompressor_prune.py``
in the peers venv (``benchmarks/peers/setup.sh``). Results go to ``benchmarks/results/prune.json``
and to the table in ``benchmarks/README.md`` between the ``prune`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from quantize_rtn import (
    BENCH, SNAPSHOT, WORK, _mib, _ratio, _run_child, _tail, add_run_options, machine, merge_rows, publish,
    snapshot_squeeze, table_footer,
)

NAME = "prune"
RESULTS = BENCH / "results" / f"{NAME}.json"
PEER_PYTHON = BENCH / "peers" / ".venv" / "bin" / "python"
PEER_SCRIPT = BENCH / "peers" / "llmcompressor_prune.py"
MODEL = "smollm2"
TEXTS = ("wikipedia", "bbc")
SEQ_LEN = 512
BATCH_SIZE = 2


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    prune: dict  # PruneConfig keywords
    quantize: dict | None = None  # scheme_from_options keywords + method, applied to the pruned checkpoint
    squeeze: bool = True  # squeeze has this method (SparseGPT rows are llm-compressor's only)
    peer: bool = True


W4_G64 = dict(mode="per-group", bits=4, group_size=64)
CONFIGS = [
    Config("wanda-50", "Wanda 50% unstructured", dict(method="wanda", sparsity=0.5)),
    Config("magnitude-50", "magnitude 50% unstructured", dict(method="magnitude", sparsity=0.5)),
    Config("wanda-2:4", "Wanda 2:4", dict(method="wanda", pattern="2:4")),
    Config("magnitude-2:4", "magnitude 2:4", dict(method="magnitude", pattern="2:4")),
    Config("wanda-2:4+gptq-w4-g64", "Wanda 2:4, then GPTQ W4 g64 sym", dict(method="wanda", pattern="2:4"), dict(W4_G64, method="gptq")),
    Config("wanda-2:4+rtn-w4-g64", "Wanda 2:4, then RTN W4 g64 sym", dict(method="wanda", pattern="2:4"), dict(W4_G64, method="rtn")),
    Config("sparsegpt-50", "SparseGPT 50% unstructured", dict(method="sparsegpt", sparsity=0.5)),
    Config("sparsegpt-2:4", "SparseGPT 2:4", dict(method="sparsegpt", pattern="2:4")),
]
BY_NAME = {c.name: c for c in CONFIGS}


def worker(name: str, calib_samples: int, eval_tokens: int, out: Path, result: Path) -> None:
    """squeeze's row: prune (and quantize) through the API, reload the checkpoint, score both texts."""
    import torch
    import transformers

    import squeeze
    from squeeze.api import prune, quantize
    from squeeze.data import evaluation_windows
    from squeeze.evaluate import compare_causal, peak_rss_bytes
    from squeeze.models import load_model
    from squeeze.prune.apply import PruneConfig
    from squeeze.prune.masks import is_n_m
    from squeeze.quant.apply import QuantizeConfig
    from squeeze.quant.scheme import scheme_from_options

    print(f"squeeze imported from {squeeze.__file__}", flush=True)
    sys.path.insert(0, str(BENCH / "peers"))
    from peer_common import score

    config = BY_NAME[name]
    pruned = out / "pruned"
    report = prune(
        MODEL, pruned, PruneConfig(**config.prune), data=TEXTS[0], calibration_samples=calib_samples,
        seq_len=SEQ_LEN, batch_size=BATCH_SIZE, evaluate=False, overwrite=True,
    ).to_dict()
    timings = dict(report["timings_s"])
    compress_s = timings.get("prune", 0.0) + timings.get("calibrate", 0.0)
    final, quant_report = pruned, None
    if config.quantize:
        options = dict(config.quantize)
        method = options.pop("method")
        final = out / "quantized"
        quant_report = quantize(
            str(pruned), final, QuantizeConfig(scheme=scheme_from_options(**options), method=method),
            data=TEXTS[0], calibration_samples=calib_samples, seq_len=SEQ_LEN, batch_size=BATCH_SIZE,
            evaluate=False, overwrite=True,
        ).to_dict()
        compress_s += quant_report["timings_s"].get("quantize", 0.0) + quant_report["timings_s"].get("calibrate", 0.0)

    reference = load_model(MODEL)
    if config.quantize:
        dequantized = transformers.CompressedTensorsConfig(dequantize=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32, quantization_config=dequantized).eval()
    else:
        model = load_model(str(final)).model  # sparse-bitmask: decoded by squeeze (transformers 5 cannot)
    pruned_names = [layer["name"] for layer in report["layers"]]
    kept = None
    if config.quantize:  # of the positions pruning zeroed, the share still exactly zero after quantization
        before = load_model(str(pruned)).model
        masks = {n: before.get_submodule(n).weight == 0 for n in pruned_names}
        del before
        kept = sum(int((model.get_submodule(n).weight[m] == 0).sum()) for n, m in masks.items()) / sum(int(m.sum()) for m in masks.values())
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in pruned_names)
    total = sum(model.get_submodule(n).weight.numel() for n in pruned_names)
    n_m = config.prune.get("pattern")
    pattern_holds = all(is_n_m(model.get_submodule(n).weight, *map(int, n_m.split(":"))) for n in pruned_names) if n_m else None
    scores = {}
    for text in TEXTS:
        windows = evaluation_windows(reference.tokenizer, text, SEQ_LEN, eval_tokens)
        scores[text] = score(compare_causal(model, windows, reference.model, batch_size=BATCH_SIZE), windows)
    sp, size = report["sparsity"], report["size"]
    final_size = quant_report["size"] if quant_report else size
    row = {
        "eval": scores,
        "sparsity_achieved": zeros / total,
        "pattern_holds": pattern_holds,
        "sparsity_kept": kept,
        "checkpoint_bytes": final_size["disk_bytes_after"],
        "dense_checkpoint_bytes": size["disk_bytes_before"],
        "pruned_layer_dense_bytes": sp["dense_bytes"],
        "pruned_layer_bytes": final_size["linear_bytes_after"],
        "pruned_layer_ratio": final_size["linear_bytes_after"] / sp["dense_bytes"],
        "flop_reduction": sp["flop_reduction"],
        "compress_s": compress_s,
        "timings_s": {"prune": timings, **({"quantize": quant_report["timings_s"]} if quant_report else {})},
        "peak_rss_bytes": peak_rss_bytes(),
        "format": report["settings"]["format"] + (f" + {quant_report['settings']['format']}" if quant_report else ""),
        "calibration_tokens": report["settings"]["calibration_tokens"],
        "notes": report["notes"] + (quant_report["notes"] if quant_report else []),
    }
    result.write_text(json.dumps(row, indent=2) + "\n")


def run(tool: str, config: Config, calib_samples: int, eval_tokens: int) -> dict:
    stem = f"{tool}-{config.name}".replace(":", "of").replace("+", "-")
    out, log, result = WORK / stem, WORK / f"{stem}.log", WORK / f"{stem}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    common = ["--calib-samples", str(calib_samples), "--eval-tokens", str(eval_tokens), "--out", str(out), "--result", str(result)]
    if tool == "squeeze":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config.name, *common]
    else:
        cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), config.name, "--seq-len", str(SEQ_LEN), *common]
    code, wall, load = _run_child(cmd, log)
    shutil.rmtree(out, ignore_errors=True)
    base = {"tool": tool, "config": config.name, "label": config.label}
    row = json.loads(result.read_text()) if result.exists() else {}
    if code != 0 or not row or "error" in row:
        return {**base, "error": f"exit {code}: {row.get('error') or _tail(log)}"}
    if tool != "squeeze":
        row.setdefault("compress_s", row.get("oneshot_s", row.get("quantize_s")))
        row.setdefault("pruned_layer_ratio", row.get("linear_ratio"))
    return {**base, **row, "wall_s": wall, "load_avg_before": load}


def _ppl(row: dict, text: str) -> float:
    return row["eval"][text]["perplexity_after"]


def targets(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if "error" not in r]
    ours = {r["config"]: r for r in ok if r["tool"] == "squeeze"}
    peer = {r["config"]: r for r in ok if r["tool"] != "squeeze"}
    checks: list[dict] = []

    def add(claim: str, needed: list, test, measured) -> None:
        if all(r is not None for r in needed):
            checks.append({"target": claim, "measured": measured(*needed), "pass": bool(test(*needed))})
        else:
            checks.append({"target": claim, "measured": "not run", "pass": None})

    show = lambda *rs: "; ".join(f"{t}: " + " vs ".join(f"{_ppl(r, t):.2f}" for r in rs) for t in TEXTS)  # noqa: E731
    add(
        "Wanda 50% perplexity ≤ llm-compressor's Wanda 50% (Wikipedia)",
        [ours.get("wanda-50"), peer.get("wanda-50")],
        lambda a, b: _ppl(a, "wikipedia") <= _ppl(b, "wikipedia"),
        show,
    )
    add(
        "SparseGPT 50% perplexity ≤ llm-compressor's SparseGPT 50%, both texts (issue #19)",
        [ours.get("sparsegpt-50"), peer.get("sparsegpt-50")],
        lambda a, b: all(_ppl(a, t) <= _ppl(b, t) for t in TEXTS),
        show,
    )
    for wanda, magnitude in (("wanda-50", "magnitude-50"), ("wanda-2:4", "magnitude-2:4")):
        add(
            f"{BY_NAME[wanda].label} beats {BY_NAME[magnitude].label}, both texts",
            [ours.get(wanda), ours.get(magnitude)],
            lambda a, b: all(_ppl(a, t) < _ppl(b, t) for t in TEXTS),
            show,
        )
    for name in ("wanda-50", "magnitude-50"):
        add(
            f"{BY_NAME[name].label}: pruned layers ≤ 55% of their dense bytes on disk",
            [ours.get(name)],
            lambda r: r["pruned_layer_ratio"] <= 0.55,
            lambda r: f"{100 * r['pruned_layer_ratio']:.1f}%",
        )
    for name in ("wanda-2:4+gptq-w4-g64", "wanda-2:4+rtn-w4-g64"):
        add(
            f"{BY_NAME[name].label}: every pruned weight still zero, 2:4 kept",
            [ours.get(name)],
            lambda r: r["sparsity_kept"] == 1 and r["pattern_holds"],
            lambda r: f"sparsity {100 * r['sparsity_achieved']:.2f}%, 2:4 {'holds' if r['pattern_holds'] else 'broken'}",
        )
    return checks


def comparisons(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if "error" not in r]
    ours = {r["config"]: r for r in ok if r["tool"] == "squeeze"}
    out = []
    for p in ok:
        if p["tool"] == "squeeze" or p["config"] not in ours:
            continue
        r = ours[p["config"]]
        out.append({
            "config": r["config"], "label": r["label"], "peer": p["tool"],
            **{f"perplexity_{t}": _ratio(_ppl(r, t), _ppl(p, t)) for t in TEXTS},
            "compress_s": _ratio(r["compress_s"], p.get("compress_s")),
            "peak_rss_bytes": _ratio(r["peak_rss_bytes"], p.get("peak_rss_bytes")),
            "checkpoint_bytes": _ratio(r["checkpoint_bytes"], p.get("checkpoint_bytes")),
        })
    return out


def table(result: dict) -> str:
    m, rows = result["machine"], result["rows"]
    first = next((r for r in rows if "error" not in r), None)
    lines = [
        f"Model: SmolLM2-135M-Instruct (squeeze built-in `{MODEL}`, fp32), every Linear layer of the 30 blocks (lm_head and embeddings dense). "
        f"Calibration (Wanda, SparseGPT, GPTQ): {result['calib_samples']} windows x {SEQ_LEN} tokens of the Wikipedia calibration split, the same rows for both tools. "
        f"Evaluation: {result['eval_tokens']:,} tokens of the Wikipedia and of the BBC news evaluation splits against the fp32 model, squeeze's compare_causal for every row.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1024**3:.1f} GiB RAM, {m['os']}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}. Run {m['date']}, squeeze {result['squeeze_source']}.",
        "",
    ]
    if first is not None:
        lines += ["fp32 perplexity: " + ", ".join(f"{t} {first['eval'][t]['perplexity_before']:.3f}" for t in TEXTS) + ".", ""]
    lines += [
        "| tool | configuration | sparsity | Wikipedia ppl | KL | BBC ppl | KL | pruned zeros kept by W4 | checkpoint MiB | pruned layers vs dense | time s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['label']} | failed: {r['error'].replace('|', '/')[:200]} | | | | | | | | | |")
            continue
        cells = [r["tool"], r["label"], f"{100 * r['sparsity_achieved']:.2f}%"]
        for t in TEXTS:
            e = r["eval"][t]
            cells += [f"{e['perplexity_after']:.2f}", f"{e['kl_divergence']:.3f}"]
        ratio, kept = r.get("pruned_layer_ratio"), r.get("sparsity_kept")
        cells += [
            f"{100 * kept:.1f}%" if isinstance(kept, (int, float)) and "+" in r["config"] else "-",
            _mib(r["checkpoint_bytes"]) if r.get("checkpoint_bytes") else "-",
            f"{100 * ratio:.1f}%" if ratio else "-",
            f"{r['compress_s']:.1f}" if r.get("compress_s") is not None else "-",
            _mib(r["peak_rss_bytes"]) if r.get("peak_rss_bytes") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if result["comparisons"]:
        lines += [
            "",
            "**squeeze ÷ llm-compressor**, same configuration, same run (below 1 favours squeeze):",
            "",
            "| configuration | Wikipedia ppl | BBC ppl | time | peak RSS | checkpoint bytes |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['label']} | {c['perplexity_wikipedia']} | {c['perplexity_bbc']} | {c['compress_s']} | {c['peak_rss_bytes']} | {c['checkpoint_bytes']} |"
            for c in result["comparisons"]
        ]
    lines += table_footer(result)
    return "\n".join(lines)


STANDING_NOTES = [
    "time s: pruning (and quantization) with its calibration; loading, evaluation and saving excluded (llm-compressor: the oneshot call). "
    "Peak RSS is the whole process, evaluation and the fp32 reference copy included.",
    "squeeze writes sparse-bitmask checkpoints (compressed-tensors' layout); 'pruned layers vs dense' is the bytes of the pruned "
    "layers' tensors on disk over the same weights stored dense at fp32 (for the W4 rows: the packed 4-bit codes and scales, stored dense).",
    "squeeze's rows are scored on the checkpoint it wrote, reloaded (sparse-bitmask decoded by squeeze's loader; the W4 rows through "
    "plain transformers with compressed-tensors, dequantized at load).",
    "squeeze's SparseGPT runs with its defaults: masks chosen within each row of every 128-column block, true-sequential "
    "(o_proj calibrated on the pruned q/k/v's outputs, down_proj on the pruned gate/up's), damping 0.01; its GPTQ with its "
    "defaults (group-aware act-order, damping 0.05, true-sequential, clip search). Rows carry the squeeze commit they ran.",
]


def write(result: dict) -> None:
    result["comparisons"] = comparisons(result["rows"])
    result["targets"] = targets(result["rows"])
    publish(result, RESULTS, table(result), NAME)


def _merge(previous: list[dict], rows: list[dict]) -> list[dict]:
    return merge_rows(previous, rows, [c.name for c in CONFIGS])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(parser, list(BY_NAME), RESULTS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.calib_samples, args.eval_tokens, args.out, args.result)
        return
    if args.render:
        write(json.loads(RESULTS.read_text()))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    source = snapshot_squeeze()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SNAPSHOT), os.environ.get("PYTHONPATH")]))
    notes = []
    peers = not args.no_peers and PEER_PYTHON.exists() and PEER_SCRIPT.exists()
    if not args.no_peers and not peers:
        notes.append("llm-compressor skipped: run benchmarks/peers/setup.sh to create its venv.")
    partial = args.peers_only or args.only or args.no_peers
    previous = json.loads(RESULTS.read_text())["rows"] if partial and RESULTS.exists() else []
    rows: list[dict] = []
    for config in [BY_NAME[n] for n in args.only] if args.only else CONFIGS:
        tools = (["squeeze"] if config.squeeze and not args.peers_only else []) + (["llm-compressor"] if peers and config.peer else [])
        for tool in tools:
            print(f"{tool} {config.name} ...", flush=True)
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            rows.append({**run(tool, config, args.calib_samples, args.eval_tokens), "started": started, "squeeze_source": source,
                         "torch_threads": os.environ.get("OMP_NUM_THREADS", "torch's default")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k in ("tool", "config", "eval", "compress_s", "peak_rss_bytes", "error")}), flush=True)
            write(_result(args, source, _merge(previous, rows), notes))
    if previous:
        notes.append("rows from more than one invocation: see each row's load average, and the JSON for each row's run")
    write(_result(args, source, _merge(previous, rows), notes))


def _result(args: argparse.Namespace, source: str, rows: list[dict], notes: list[str]) -> dict:
    how = [f"{r['tool']}, {r['label']}: {r['how']}" for r in rows if r["tool"] != "squeeze" and "how" in r]
    return {
        "benchmark": NAME,
        "model": MODEL,
        "texts": list(TEXTS),
        "seq_len": SEQ_LEN,
        "calib_samples": args.calib_samples,
        "eval_tokens": args.eval_tokens,
        "squeeze_source": source,
        "machine": machine(),
        "rows": rows,
        "notes": [*notes, *STANDING_NOTES, *how, *sorted({n for r in rows if r["tool"] != "squeeze" for n in r.get("notes", [])})],
    }


if __name__ == "__main__":
    main()
