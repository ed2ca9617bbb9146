"""Calibrated quantization of SmolLM2 (GPTQ, AWQ, SmoothQuant) next to RTN, llm-compressor and GPTQModel.

    python benchmarks/quantize_calibrated.py [--calib-samples 32] [--eval-tokens 4096] [--only NAME ...] [--no-peers]

Every row quantizes the same fp32 model on the same calibration token rows (squeeze's
``calibration_windows`` of the Wikipedia calibration split) and is scored on the same evaluation
windows of two texts (Wikipedia and BBC news evaluation splits) by squeeze's ``compare_causal``.
Each configuration runs in a fresh subprocess so that peak RSS is its own: squeeze through
``squeeze.api.quantize`` (its report gives time, bytes and the Wikipedia score; the BBC score is
taken from the checkpoint reloaded by plain transformers), llm-compressor through
``benchmarks/peers/llmcompressor_calibrated.py`` and GPTQModel through
``benchmarks/peers/gptqmodel_gptq.py``, each in its own venv (``benchmarks/peers/setup.sh``).
Results go to ``benchmarks/results/quantize_calibrated.json`` and to the table in
``benchmarks/README.md`` between the ``quantize_calibrated`` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from quantize_rtn import (
    BENCH, REPO, WORK, _mib, _ratio, _run_child, _tail, add_run_options, machine, merge_rows, publish,
    snapshot_for_children, table_footer,
)

NAME = "quantize_calibrated"
RESULTS = BENCH / "results" / f"{NAME}.json"
PEERS = {
    "llm-compressor": (BENCH / "peers" / ".venv" / "bin" / "python", BENCH / "peers" / "llmcompressor_calibrated.py"),
    "gptqmodel": (BENCH / "peers" / ".venv-gptqmodel" / "bin" / "python", BENCH / "peers" / "gptqmodel_gptq.py"),
    "auto-round": (BENCH / "peers" / ".venv-autoround" / "bin" / "python", BENCH / "peers" / "autoround_peer.py"),
    "hqq": (BENCH / "peers" / ".venv-hqq" / "bin" / "python", BENCH / "peers" / "hqq_peer.py"),
}
SETUP = {"auto-round": "setup_autoround.sh", "hqq": "setup_hqq.sh"}  # peers outside benchmarks/peers/setup.sh
MODEL = "smollm2"
TEXTS = ("wikipedia", "bbc")
SEQ_LEN = 512
BATCH_SIZE = 2

W4_CHANNEL = dict(mode="per-channel", bits=4)
W4_G64 = dict(mode="per-group", bits=4, group_size=64)
W3_G64 = dict(mode="per-group", bits=3, group_size=64)
W8A8 = dict(mode="per-channel", bits=8, act="per-token")
ROTATE = dict(rotate="hadamard")
SIGNED = dict(signed_scale=True)  # the full 2^bits-level symmetric grid (--signed-scale)
ROTATION_SEEDS = (1, 2, 3)  # rotate_seed of the extra rotated GPTQ rows (the rotated rows use seed 0)


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    scheme: dict  # squeeze.quant.scheme.scheme_from_options keywords
    method: dict  # QuantizeConfig keywords: method and its options
    peers: tuple[str, ...] = ("llm-compressor",)
    notes: list[str] = field(default_factory=list)
    seed_of: str | None = None  # another seed of this configuration's random rotation: kept out of best-of comparisons

    @property
    def weights(self) -> str:
        """The weight grid the row is compared on across methods and tools: ``w4-g64``, ``w8-channel``..."""
        s = self.scheme
        grid = f"g{s['group_size']}" if s.get("mode") == "per-group" else "channel"
        return f"w{s['bits']}-{grid}" + ("-a8" if s.get("act", "none") != "none" else "")


# the headline comparisons first, so that a run cut short still answers them
CONFIGS = [
    Config("gptq-w4-g64", "GPTQ W4 group-64 sym", W4_G64, dict(method="gptq"), ("llm-compressor", "gptqmodel")),
    Config("rtn-w4-g64", "RTN W4 group-64 sym", W4_G64, dict(method="rtn")),
    Config("awq-w4-g64", "AWQ W4 group-64 sym", W4_G64, dict(method="awq")),
    Config("smoothquant-a0.5", "SmoothQuant W8A8, alpha 0.5", W8A8, dict(method="smoothquant", options=dict(alpha=0.5))),
    Config("w8a8", "W8A8 RTN (no smoothing)", W8A8, dict(method="rtn")),
    Config("smoothquant-a0.8", "SmoothQuant W8A8, alpha 0.8", W8A8, dict(method="smoothquant", options=dict(alpha=0.8))),
    Config("gptq-w4-per-channel", "GPTQ W4 per-channel sym", W4_CHANNEL, dict(method="gptq"), ("llm-compressor", "gptqmodel")),
    Config("rtn-w4-per-channel", "RTN W4 per-channel sym", W4_CHANNEL, dict(method="rtn")),
    Config("awq-w4-per-channel", "AWQ W4 per-channel sym", W4_CHANNEL, dict(method="awq")),
    # the quality frontier: learned rounding, HQQ, rotations, W3
    Config("autoround-w4-g64", "AutoRound W4 group-64 sym", W4_G64, dict(method="autoround"), ("auto-round",)),
    Config("hqq-w4-g64", "HQQ W4 group-64 asym", {**W4_G64, "asym": True}, dict(method="hqq"), ("hqq",)),
    Config("rtn-w4-g64-rot", "RTN W4 group-64 sym, Hadamard-rotated", W4_G64, dict(method="rtn", **ROTATE), ()),
    Config("gptq-w4-g64-rot", "GPTQ W4 group-64 sym, Hadamard-rotated", W4_G64, dict(method="gptq", **ROTATE), ()),
    Config("autoround-w4-g64-rot", "AutoRound W4 group-64 sym, Hadamard-rotated", W4_G64, dict(method="autoround", **ROTATE), ()),
    Config("w8a8-rot", "W8A8 RTN, Hadamard-rotated", W8A8, dict(method="rtn", **ROTATE), ()),
    # GPTQ's error feedback undoes the weight error that folding the norms into the rotated weights adds
    Config("gptq-w8a8-rot", "GPTQ W8A8, Hadamard-rotated", W8A8, dict(method="gptq", **ROTATE), ()),
    Config("smoothquant-search", "SmoothQuant W8A8, alpha searched per fold", W8A8,
           dict(method="smoothquant", options=dict(alpha_search=True)), ()),
    Config("smoothquant-search-rot", "SmoothQuant W8A8, alpha searched per fold, Hadamard-rotated", W8A8,
           dict(method="smoothquant", options=dict(alpha_search=True), **ROTATE), ()),
    Config("rtn-w3-g64", "RTN W3 group-64 sym", W3_G64, dict(method="rtn"), ()),
    Config("gptq-w3-g64", "GPTQ W3 group-64 sym", W3_G64, dict(method="gptq"), ("gptqmodel",)),
    Config("autoround-w3-g64", "AutoRound W3 group-64 sym", W3_G64, dict(method="autoround"), ("auto-round",)),
    Config("hqq-w3-g64", "HQQ W3 group-64 asym", {**W3_G64, "asym": True}, dict(method="hqq"), ("hqq",)),
    Config("gptq-w3-g64-rot", "GPTQ W3 group-64 sym, Hadamard-rotated", W3_G64, dict(method="gptq", **ROTATE), ()),
    # the full symmetric grid: signed scales, every one of the 2^bits codes used (auto-round's and llama.cpp's grid)
    Config("gptq-w4-g64-signed", "GPTQ W4 group-64 sym, signed scales", {**W4_G64, **SIGNED}, dict(method="gptq"), ()),
    Config("gptq-w3-g64-signed", "GPTQ W3 group-64 sym, signed scales", {**W3_G64, **SIGNED}, dict(method="gptq"), ()),
    Config("autoround-w4-g64-signed", "AutoRound W4 group-64 sym, signed scales", {**W4_G64, **SIGNED}, dict(method="autoround"), ()),
    Config("autoround-w3-g64-signed", "AutoRound W3 group-64 sym, signed scales", {**W3_G64, **SIGNED}, dict(method="autoround"), ()),
    # how much the rotation's random signs move the result: gptq-w4-g64-rot is seed 0
    *(
        Config(f"gptq-w4-g64-rot-seed{seed}", f"GPTQ W4 group-64 sym, Hadamard-rotated, seed {seed}", W4_G64,
               dict(method="gptq", **ROTATE, rotate_seed=seed), (), seed_of="gptq-w4-g64-rot")
        for seed in ROTATION_SEEDS
    ),
]
BY_NAME = {c.name: c for c in CONFIGS}


# ---------------------------------------------------------------------------------------------
# One configuration, in its own process


def worker(name: str, calib_samples: int, eval_tokens: int, out: Path, result: Path) -> None:
    """squeeze's row: quantize through the API, then score the reloaded checkpoint on the second text."""
    import torch
    import transformers

    import squeeze
    from squeeze.api import quantize
    from squeeze.data import evaluation_windows
    from squeeze.evaluate import compare_causal
    from squeeze.models import load_model
    from squeeze.quant.apply import QuantizeConfig
    from squeeze.quant.scheme import scheme_from_options

    print(f"squeeze imported from {squeeze.__file__}", flush=True)  # the run's snapshot, not the live tree
    sys.path.insert(0, str(BENCH / "peers"))
    from peer_common import score  # the row fields every tool's scores share

    config = BY_NAME[name]
    quantize_config = QuantizeConfig(scheme=scheme_from_options(**config.scheme), **config.method)
    report = quantize(
        MODEL, out, quantize_config, data=TEXTS[0], eval_tokens=eval_tokens, seq_len=SEQ_LEN,
        calibration_samples=calib_samples, batch_size=BATCH_SIZE, overwrite=True,
    ).to_dict()
    acc = report["accuracy"]
    scores = {TEXTS[0]: {k: acc[k] for k in ("perplexity_before", "perplexity_after", "perplexity_change", "kl_divergence", "top1_agreement")}}
    scores[TEXTS[0]].update(eval_tokens=acc["tokens"], eval_windows=acc["windows"])

    reference = load_model(MODEL)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for text in TEXTS[1:]:
        windows = evaluation_windows(reference.tokenizer, text, SEQ_LEN, eval_tokens)
        scores[text] = score(compare_causal(reloaded, windows, reference.model, batch_size=BATCH_SIZE), windows)
    size, timings = report["size"], report["timings_s"]
    row = {
        "scheme": report["settings"]["scheme"],
        "format": report["settings"]["format"],
        "eval": scores,
        "checkpoint_bytes": size["disk_bytes_after"],
        "dense_checkpoint_bytes": size["disk_bytes_before"],
        "linear_bytes_before": size["linear_bytes_before"],
        "linear_bytes_after": size["linear_bytes_after"],
        "linear_ratio": size["linear_ratio"],
        "bits_per_weight": size["bits_per_weight"],
        "calibration_tokens": report["settings"]["calibration_tokens"],
        "quantize_s": timings.get("quantize", 0.0) + timings.get("calibrate", 0.0),
        "timings_s": timings,
        "peak_rss_bytes": report["peak_rss_bytes"],
        "settings": {k: v for k, v in report["settings"].items() if k not in ("full_precision_linear_layers",)},
        "notes": report["notes"],
    }
    result.write_text(json.dumps(row, indent=2) + "\n")


def run(tool: str, config: Config, calib_samples: int, eval_tokens: int) -> dict:
    """One row, by ``tool`` (squeeze or a peer), in a subprocess."""
    stem = f"{tool}-{config.name}"
    out, log, result = WORK / stem, WORK / f"{stem}.log", WORK / f"{stem}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    common = ["--calib-samples", str(calib_samples), "--eval-tokens", str(eval_tokens), "--out", str(out), "--result", str(result)]
    if tool == "squeeze":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config.name, *common]
    else:
        python, script = PEERS[tool]
        cmd = [str(python), str(script), config.name, "--seq-len", str(SEQ_LEN), *common]
    code, wall, load = _run_child(cmd, log)
    shutil.rmtree(out, ignore_errors=True)  # only the measurements are kept; disk is finite
    base = {"tool": tool, "config": config.name, "label": config.label}
    if code != 0 or not result.exists():
        return {**base, "error": f"exit {code}: {_tail(log)}"}
    return {**base, **json.loads(result.read_text()), "wall_s": wall, "load_avg_before": load}


# ---------------------------------------------------------------------------------------------
# Targets, ratios, table


def _ppl(row: dict, text: str) -> float:
    return row["eval"][text]["perplexity_after"]


def _fp32(row: dict, text: str) -> float:
    return row["eval"][text]["perplexity_before"]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each checked on this run's rows."""
    ok = [r for r in rows if "error" not in r]
    ours = {r["config"]: r for r in ok if r["tool"] == "squeeze"}
    peer = {(r["tool"], r["config"]): r for r in ok if r["tool"] != "squeeze"}
    checks: list[dict] = []

    def add(claim: str, rows_needed: list, test, measured) -> None:
        if all(r is not None for r in rows_needed):
            checks.append({"target": claim, "measured": measured(*rows_needed), "pass": bool(test(*rows_needed))})
        else:
            checks.append({"target": claim, "measured": "not run", "pass": None})

    both = lambda f: lambda *rs: all(f(*rs, t) for t in TEXTS)  # noqa: E731
    show = lambda *rs: "; ".join(f"{t}: " + " vs ".join(f"{_ppl(r, t):.3f}" for r in rs) for t in TEXTS)  # noqa: E731
    for method in ("gptq", "awq"):
        name = f"{method}-w4-g64"
        add(
            f"{method.upper()} W4 g64 perplexity ≤ llm-compressor's, both texts",
            [ours.get(name), peer.get(("llm-compressor", name))],
            both(lambda a, b, t: _ppl(a, t) <= _ppl(b, t)),
            show,
        )
    for scheme in ("w4-per-channel", "w4-g64"):
        add(
            f"GPTQ strictly better than RTN, {scheme}, both texts",
            [ours.get(f"gptq-{scheme}"), ours.get(f"rtn-{scheme}")],
            both(lambda g, r, t: _ppl(g, t) < _ppl(r, t)),
            show,
        )
    add(
        "stretch: GPTQ W4 g64 closes half of RTN's gap to fp32, both texts",
        [ours.get("gptq-w4-g64"), ours.get("rtn-w4-g64")],
        both(lambda g, r, t: _ppl(g, t) - _fp32(g, t) <= 0.5 * (_ppl(r, t) - _fp32(r, t))),
        lambda g, r: "; ".join(
            f"{t}: {(_ppl(g, t) - _fp32(g, t)) / (_ppl(r, t) - _fp32(r, t)):.2f} of RTN's gap" for t in TEXTS
        ),
    )
    add(
        "AWQ W4 g64 in minutes (quantize time < 10 min)",
        [ours.get("awq-w4-g64")],
        lambda r: r["quantize_s"] < 600,
        lambda r: f"{r['quantize_s']:.0f} s",
    )
    for name in ("smoothquant-a0.5", "smoothquant-a0.8"):
        add(
            f"{BY_NAME[name].label} within 1% of fp32 perplexity (Wikipedia)",
            [ours.get(name)],
            lambda r: abs(r["eval"]["wikipedia"]["perplexity_change"]) <= 0.01,
            lambda r: "; ".join(f"{t}: {100 * r['eval'][t]['perplexity_change']:+.2f}%" for t in TEXTS),
        )
    frontier_targets(ours, peer, add, both, show)
    for (tool, name), p in sorted(peer.items()):
        if tool != "llm-compressor" or name not in ours:
            continue
        r = ours[name]
        add(
            f"{BY_NAME[name].label}: quantize time ≤ 0.5x llm-compressor's, peak RSS ≤ its",
            [r, p],
            lambda a, b: a["quantize_s"] <= 0.5 * b["quantize_s"] and a["peak_rss_bytes"] <= b["peak_rss_bytes"],
            lambda a, b: f"time {_ratio(a['quantize_s'], b['quantize_s'])}, RSS {_ratio(a['peak_rss_bytes'], b['peak_rss_bytes'])}",
        )
    return checks


def _log_gap(row: dict, text: str) -> float:
    return math.log(_ppl(row, text)) - math.log(_fp32(row, text))


def frontier_targets(ours: dict, peer: dict, add, both, show) -> None:
    """The quality-frontier targets: the best of each side per weight grid, learned rounding's share
    of RTN's gap, rotations."""
    for grid in ("w4-g64", "w3-g64"):
        mine = [r for name, r in ours.items() if BY_NAME[name].weights == grid and BY_NAME[name].seed_of is None]
        theirs = [r for (_, name), r in peer.items() if name in BY_NAME and BY_NAME[name].weights == grid]
        best = lambda rows, t: min(rows, key=lambda r: _ppl(r, t))  # noqa: E731
        add(
            f"{grid.upper()}: squeeze's best method ≤ every peer's best, both texts",
            [mine or None, theirs or None],
            lambda a, b: all(_ppl(best(a, t), t) <= _ppl(best(b, t), t) for t in TEXTS),
            lambda a, b: "; ".join(
                f"{t}: {best(a, t)['label']} {_ppl(best(a, t), t):.3f} vs {best(b, t)['tool']} {best(b, t)['label']} {_ppl(best(b, t), t):.3f}"
                for t in TEXTS
            ),
        )
    add(
        "AutoRound W4 g64 closes ≥ 50% of RTN's log-perplexity gap to fp32, both texts",
        [ours.get("autoround-w4-g64"), ours.get("rtn-w4-g64")],
        both(lambda a, r, t: _log_gap(a, t) <= 0.5 * _log_gap(r, t)),
        lambda a, r: "; ".join(f"{t}: closes {1 - _log_gap(a, t) / _log_gap(r, t):.0%}" for t in TEXTS),
    )
    rotated_w8a8 = [r for name, r in ours.items() if BY_NAME[name].weights == "w8-channel-a8" and "rotate" in BY_NAME[name].method]
    worst = lambda r: max(abs(r["eval"][t]["perplexity_change"]) for t in TEXTS)  # noqa: E731
    add(
        "W8A8 with rotation within 0.5% of fp32 perplexity, both texts (the best rotated W8A8 row)",
        [min(rotated_w8a8, key=worst) if rotated_w8a8 else None],
        lambda r: worst(r) <= 0.005,
        lambda r: f"{r['label']}: " + "; ".join(f"{t}: {100 * r['eval'][t]['perplexity_change']:+.2f}%" for t in TEXTS),
    )
    add(
        "rotation + GPTQ W4 g64 better than GPTQ alone, both texts",
        [ours.get("gptq-w4-g64-rot"), ours.get("gptq-w4-g64")],
        both(lambda a, b, t: _ppl(a, t) < _ppl(b, t)),
        show,
    )
    seeds = [ours.get("gptq-w4-g64-rot")] + [ours.get(c.name) for c in CONFIGS if c.seed_of == "gptq-w4-g64-rot"]
    geomean = lambda rows, t: math.exp(sum(math.log(_ppl(r, t)) for r in rows) / len(rows))  # noqa: E731
    add(
        f"not the issue's target: rotation + GPTQ W4 g64 over {len(seeds)} rotation seeds (geometric mean) better than GPTQ alone, both texts",
        [seeds if all(seeds) else None, ours.get("gptq-w4-g64")],
        both(lambda rs, b, t: geomean(rs, t) < _ppl(b, t)),
        lambda rs, b: "; ".join(
            f"{t}: {geomean(rs, t):.3f} (seeds {min(_ppl(r, t) for r in rs):.3f} to {max(_ppl(r, t) for r in rs):.3f}) vs {_ppl(b, t):.3f}"
            for t in TEXTS
        ),
    )
    add(
        "GPTQ W4 g64 ≤ GPTQModel's, both texts",
        [ours.get("gptq-w4-g64"), peer.get(("gptqmodel", "gptq-w4-g64"))],
        both(lambda a, b, t: _ppl(a, t) <= _ppl(b, t)),
        show,
    )
    add(
        "SmoothQuant W8A8 (alpha searched) within 1% of fp32 perplexity, both texts",
        [ours.get("smoothquant-search")],
        lambda r: all(abs(r["eval"][t]["perplexity_change"]) <= 0.01 for t in TEXTS),
        lambda r: "; ".join(f"{t}: {100 * r['eval'][t]['perplexity_change']:+.2f}%" for t in TEXTS),
    )


def comparisons(rows: list[dict]) -> list[dict]:
    """squeeze ÷ peer for every (config, peer) both ran."""
    ok = [r for r in rows if "error" not in r]
    ours = {r["config"]: r for r in ok if r["tool"] == "squeeze"}
    out = []
    for p in ok:
        if p["tool"] == "squeeze" or p["config"] not in ours:
            continue
        r = ours[p["config"]]
        out.append(
            {
                "config": r["config"],
                "label": r["label"],
                "peer": p["tool"],
                **{f"perplexity_{t}": _ratio(_ppl(r, t), _ppl(p, t)) for t in TEXTS},
                "quantize_s": _ratio(r["quantize_s"], p["quantize_s"]),
                "peak_rss_bytes": _ratio(r["peak_rss_bytes"], p["peak_rss_bytes"]),
                "checkpoint_bytes": _ratio(r["checkpoint_bytes"], p["checkpoint_bytes"]) if "checkpoint_bytes" in p else "-",
            }
        )
    return out


def table(result: dict) -> str:
    m, rows = result["machine"], result["rows"]
    first = next((r for r in rows if "error" not in r), None)
    lines = [
        f"Model: SmolLM2-135M-Instruct (squeeze built-in `{MODEL}`, fp32), every Linear layer but lm_head. "
        f"Calibration: {result['calib_samples']} windows x {SEQ_LEN} tokens of the Wikipedia calibration split, the same token rows for every tool. "
        f"Evaluation: {result['eval_tokens']:,} tokens ({SEQ_LEN}-token windows) of the Wikipedia and of the BBC news evaluation splits, "
        "scored by squeeze's compare_causal against the fp32 model for every row.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1024**3:.1f} GiB RAM, {m['os']}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}. Run {m['date']}, squeeze {result['squeeze_source']}.",
        "",
    ]
    if first is not None:
        lines.append(
            "fp32 perplexity: " + ", ".join(f"{t} {_fp32(first, t):.3f}" for t in TEXTS) + "."
        )
        lines.append("")
    lines += [
        "| tool | configuration | Wikipedia ppl | Δ | KL | BBC ppl | Δ | KL | checkpoint MiB | bits/weight | quantize s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['label']} | failed: {r['error'].replace('|', '/')[:200]} | | | | | | | | | |")
            continue
        cells = [r["tool"], r["label"]]
        for t in TEXTS:
            e = r["eval"][t]
            cells += [f"{e['perplexity_after']:.3f}", f"{100 * e['perplexity_change']:+.2f}%", f"{e['kl_divergence']:.4f}"]
        size = _mib(r["checkpoint_bytes"]) if "checkpoint_bytes" in r else "-"  # peers scored in memory write none
        cells += [size, f"{r['bits_per_weight']:.2f}", f"{r['quantize_s']:.1f}", _mib(r["peak_rss_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    if result["comparisons"]:
        lines += [
            "",
            "**squeeze ÷ peer**, same configuration, same run (below 1 favours squeeze):",
            "",
            "| configuration | peer | Wikipedia ppl | BBC ppl | quantize time | peak RSS | checkpoint bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['label']} | {c['peer']} | {c['perplexity_wikipedia']} | {c['perplexity_bbc']} | {c['quantize_s']} | {c['peak_rss_bytes']} | {c['checkpoint_bytes']} |"
            for c in result["comparisons"]
        ]
    lines += table_footer(result)
    return "\n".join(lines)


def write(result: dict) -> None:
    result["comparisons"] = comparisons(result["rows"])
    result["targets"] = targets(result["rows"])
    publish(result, RESULTS, table(result), NAME)


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

    # its own snapshot: another partial invocation may be running beside this one
    snapshot = WORK / f"squeeze-src-calibrated-{os.getpid()}"
    source = snapshot_for_children(snapshot)
    try:
        measure(args, source)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def measure(args: argparse.Namespace, source: str) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    notes = []
    tools = [] if args.no_peers else [t for t, (python, _) in PEERS.items() if python.exists()]
    for tool, (python, _) in PEERS.items():
        if not args.no_peers and not python.exists():
            notes.append(f"{tool} skipped: {python.relative_to(REPO)} is missing; run benchmarks/peers/{SETUP.get(tool, 'setup.sh')}.")
    rows: list[dict] = []
    # a partial invocation (some configurations, or one side only) keeps the other rows already measured
    partial = args.peers_only or args.only or args.no_peers
    # the rows already measured are read again before every write, so that two partial invocations
    # running at once (say, a slow peer's rows beside squeeze's) keep each other's rows
    previous = lambda: json.loads(RESULTS.read_text())["rows"] if partial and RESULTS.exists() else []  # noqa: E731
    merged_earlier = bool(previous())
    for config in [BY_NAME[n] for n in args.only] if args.only else CONFIGS:
        runs = ([] if args.peers_only else ["squeeze"]) + [t for t in config.peers if t in tools]
        for tool in runs:
            print(f"{tool} {config.name} ...", flush=True)
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            rows.append({**run(tool, config, args.calib_samples, args.eval_tokens), "started": started, "squeeze_source": source,
                         "torch_threads": os.environ.get("OMP_NUM_THREADS", "torch's default")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k in ("tool", "config", "eval", "quantize_s", "peak_rss_bytes", "error")}), flush=True)
            # written after every row: a run cut short keeps what it measured
            write(_result(args, source, _merge(previous(), rows), notes))
    if merged_earlier:
        notes.append("rows from more than one invocation: see each row's load average and the run dates in the JSON")
    write(_result(args, source, _merge(previous(), rows), notes))


def _merge(previous: list[dict], rows: list[dict]) -> list[dict]:
    return merge_rows(previous, rows, [c.name for c in CONFIGS])


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
        "notes": [*notes, *STANDING_NOTES, *how],
    }


STANDING_NOTES = [
    "quantize s: calibration and quantization (squeeze: its report's calibrate + quantize stages; llm-compressor: the oneshot call; "
    "GPTQModel: its quantize call); model load, evaluation and saving excluded. Peak RSS is the whole process (ru_maxrss), "
    "evaluation and the fp32 reference copy every tool keeps for scoring included.",
    "Every W4 row is symmetric so that all tools quantize to the same grid; RTN and plain W8A8 use no calibration data.",
    "Rows marked \"signed scales\" use --signed-scale: each group's scale takes the sign of its largest weight, which becomes the code -2^(bits-1), so all 2^bits codes are used (auto-round's int_sym grid and llama.cpp's Q4_0); squeeze's other symmetric rows, llm-compressor and GPTQModel use compressed-tensors' balanced grid (step max/(2^(bits-1) - 1/2)).",
    "squeeze's GPTQ runs with its defaults: group-aware act-order (whole groups in order of input energy, each group's scale "
    "from the updated weights), damping 0.05, block 128, true-sequential (o_proj calibrated on the quantized q/k/v's outputs, "
    "down_proj on the quantized gate/up's), clip search (each group's range from 49 shrinkings of its min/max, least "
    "Hessian-diagonal-weighted rounding error), the quantized block producing the next block's inputs. AutoRound learns "
    "each block against the unquantized model's output at its depth. Rows measured before those defaults carry their "
    "settings in the JSON.",
]

if __name__ == "__main__":
    main()
