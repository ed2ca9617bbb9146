"""HQQ in squeeze next to round-to-nearest, GPTQ and the hqq package, on SmolLM2 at W4 (asym and sym) and W3 group-64.

    python benchmarks/quantize_hqq.py [--calib-samples 32] [--eval-tokens 4096] [--only NAME ...] [--no-peers]

Every row of a scheme quantizes the same fp32 model the same way (groups of 64 input columns,
every Linear but lm_head) and is scored on the same evaluation windows of two texts
(Wikipedia and BBC news evaluation splits) by squeeze's ``compare_causal`` against the fp32 model.
Each row runs in a fresh subprocess: squeeze's rows through ``squeeze.api.quantize`` (GPTQ on the
calibrated benchmark's 32 x 512 Wikipedia calibration tokens; RTN and HQQ read none), the BBC score
taken from the checkpoint reloaded by plain transformers; the hqq package's rows through
``benchmarks/peers/hqq_peer.py`` in its own venv (``benchmarks/peers/setup_hqq.sh``), once as it
is and once with its zero points rounded to integers (``--integer-zero``). Results go to
``benchmarks/results/quantize_hqq.json`` and to the table in ``benchmarks/README.md`` between the
``quantize_hqq`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from quantize_calibrated import BATCH_SIZE, MODEL, SEQ_LEN, TEXTS, Config
from quantize_rtn import (
    BENCH, REPO, SNAPSHOT, WORK, _ratio, _run_child, _tail, add_run_options, machine, merge_rows, publish,
    snapshot_squeeze, table_footer,
)

NAME = "quantize_hqq"
RESULTS = BENCH / "results" / f"{NAME}.json"
PEER = "hqq"
PEER_PYTHON = BENCH / "peers" / ".venv-hqq" / "bin" / "python"
PEER_SCRIPT = BENCH / "peers" / "hqq_peer.py"

W4_G64 = dict(mode="per-group", bits=4, group_size=64, asym=True)
W4S_G64 = dict(mode="per-group", bits=4, group_size=64, asym=False)
W3_G64 = dict(mode="per-group", bits=3, group_size=64, asym=True)
# the hqq package as it is (a float16 zero point per group) and with its zero point rounded to the
# integer grid squeeze's formats store: the same storage as squeeze's rows
PEERS = (PEER, f"{PEER}-int")

# HQQ first in each scheme, so that a run cut short still answers the question. The hqq
# package has no symmetric mode, so the symmetric rows compare squeeze's methods only.
CONFIGS = [
    Config("hqq-w4-g64", "HQQ W4 group-64 asym", W4_G64, dict(method="hqq"), PEERS),
    Config("rtn-w4-g64", "RTN W4 group-64 asym", W4_G64, dict(method="rtn"), ()),
    Config("gptq-w4-g64", "GPTQ W4 group-64 asym", W4_G64, dict(method="gptq"), ()),
    Config("hqq-w4s-g64", "HQQ W4 group-64 sym", W4S_G64, dict(method="hqq"), ()),
    Config("rtn-w4s-g64", "RTN W4 group-64 sym", W4S_G64, dict(method="rtn"), ()),
    Config("gptq-w4s-g64", "GPTQ W4 group-64 sym", W4S_G64, dict(method="gptq"), ()),
    Config("hqq-w3-g64", "HQQ W3 group-64 asym", W3_G64, dict(method="hqq"), PEERS),
    Config("rtn-w3-g64", "RTN W3 group-64 asym", W3_G64, dict(method="rtn"), ()),
    Config("gptq-w3-g64", "GPTQ W3 group-64 asym", W3_G64, dict(method="gptq"), ()),
]
BY_NAME = {c.name: c for c in CONFIGS}
SCHEMES = {"w4-g64": "W4 group-64 asym", "w4s-g64": "W4 group-64 sym", "w3-g64": "W3 group-64 asym"}
# the package rows of a squeeze row's comparisons: (tool, words)
PACKAGE_ROWS = ((PEER, "hqq package"), (f"{PEER}-int", "hqq package, integer zero"))


def worker(config: Config, calib_samples: int, eval_tokens: int, out: Path) -> dict:
    """squeeze's row (in its subprocess): quantize through the API, score the reloaded checkpoint on the second text."""
    # imported here, in the subprocess, so that they come from the run's snapshot of squeeze
    import torch
    import transformers

    from squeeze.api import quantize
    from squeeze.data import evaluation_windows
    from squeeze.evaluate import compare_causal
    from squeeze.models import load_model
    from squeeze.quant.config import QuantizeConfig
    from squeeze.quant.scheme import scheme_from_options

    sys.path.insert(0, str(BENCH / "peers"))
    from peer_common import score

    report = quantize(
        MODEL, out, QuantizeConfig(scheme=scheme_from_options(**config.scheme), **config.method), data=TEXTS[0],
        eval_tokens=eval_tokens, seq_len=SEQ_LEN, calibration_samples=calib_samples, batch_size=BATCH_SIZE, overwrite=True,
        generation_prompts=0,
    ).to_dict()
    acc = report["accuracy"]
    scores = {TEXTS[0]: {k: acc[k] for k in ("perplexity_before", "perplexity_after", "perplexity_change", "kl_divergence", "top1_agreement")}}
    reference = load_model(MODEL)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for text in TEXTS[1:]:
        windows = evaluation_windows(reference.tokenizer, text, SEQ_LEN, eval_tokens)
        scores[text] = score(compare_causal(reloaded, windows, reference.model, batch_size=BATCH_SIZE), windows)
    timings = report["timings_s"]
    return {
        "scheme": report["settings"]["scheme"],
        "format": report["settings"]["format"],
        "eval": scores,
        "bits_per_weight": report["size"]["bits_per_weight"],
        "checkpoint_bytes": report["size"]["disk_bytes_after"],
        "quantize_s": timings.get("quantize", 0.0) + timings.get("calibrate", 0.0),
        "timings_s": timings,
        "settings": {k: v for k, v in report["settings"].items() if k != "full_precision_linear_layers"},
        "notes": report["notes"],
    }


def run(tool: str, config: Config, calib_samples: int, eval_tokens: int) -> dict:
    """One row, by squeeze or the hqq package, in a subprocess."""
    stem = f"{tool}-{config.name}"
    out, log, result = WORK / stem, WORK / f"{stem}.log", WORK / f"{stem}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    common = ["--calib-samples", str(calib_samples), "--eval-tokens", str(eval_tokens), "--out", str(out), "--result", str(result)]
    if tool == "squeeze":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config.name, *common]
    else:
        integer = ["--integer-zero"] if tool == f"{PEER}-int" else []
        cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), config.name, *integer, "--seq-len", str(SEQ_LEN), *common]
    code, wall, load = _run_child(cmd, log)
    shutil.rmtree(out, ignore_errors=True)  # only the measurements are kept
    base = {"tool": tool, "config": config.name, "label": config.label}
    if code != 0 or not result.exists():
        return {**base, "error": f"exit {code}: {_tail(log)}"}
    return {**base, **json.loads(result.read_text()), "wall_s": wall, "load_avg_before": load}


# ---------------------------------------------------------------------------------------------
# Targets, ratios, table


def _kl(row: dict, text: str) -> float:
    return row["eval"][text]["kl_divergence"]


def _rows(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(method or peer, scheme) → row, e.g. ("hqq", "w4-g64") for squeeze's HQQ, ("peer:hqq-int", ...) for a package's."""
    out = {}
    for r in rows:
        if "error" in r:
            continue
        method, _, scheme = r["config"].partition("-")
        out[(method if r["tool"] == "squeeze" else f"peer:{r['tool']}", scheme)] = r
    return out


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets for HQQ, each checked on this run's rows."""
    by = _rows(rows)
    checks: list[dict] = []

    def add(claim: str, needed: list, test, measured) -> None:
        if all(r is not None for r in needed):
            checks.append({"target": claim, "measured": measured(*needed), "pass": bool(test(*needed))})
        else:
            checks.append({"target": claim, "measured": "not run", "pass": None})

    show_kl = lambda *rs: "; ".join(f"{t}: " + " vs ".join(f"{_kl(r, t):.4f}" for r in rs) for t in TEXTS)  # noqa: E731
    for scheme, words in SCHEMES.items():
        ours = by.get(("hqq", scheme))
        add(f"HQQ {words}: KL below RTN's, both texts", [ours, by.get(("rtn", scheme))],
            lambda a, b: all(_kl(a, t) < _kl(b, t) for t in TEXTS), show_kl)
        for tool, name in PACKAGE_ROWS:
            theirs = by.get((f"peer:{tool}", scheme))
            if theirs is None and not any(c.name == f"hqq-{scheme}" and tool in c.peers for c in CONFIGS):
                continue  # no such package row for this scheme (the package has no symmetric mode)
            add(f"HQQ {words}: KL at most the {name}'s, both texts", [ours, theirs],
                lambda a, b: all(_kl(a, t) <= _kl(b, t) for t in TEXTS), show_kl)
            add(f"HQQ {words}: quantize time at most the {name}'s", [ours, theirs],
                lambda a, b: a["quantize_s"] <= b["quantize_s"], lambda a, b: f"{a['quantize_s']:.1f} s vs {b['quantize_s']:.1f} s")
    return checks


def comparisons(rows: list[dict]) -> list[dict]:
    """squeeze's HQQ ÷ RTN, GPTQ and the hqq package, same scheme, same run."""
    by = _rows(rows)
    out = []
    for scheme, words in SCHEMES.items():
        ours = by.get(("hqq", scheme))
        for other, name in (("rtn", "RTN"), ("gptq", "GPTQ"), *((f"peer:{tool}", words) for tool, words in PACKAGE_ROWS)):
            theirs = by.get((other, scheme))
            if ours is None or theirs is None:
                continue
            out.append({
                "scheme": words,
                "versus": name,
                **{f"kl_{t}": _ratio(_kl(ours, t), _kl(theirs, t)) for t in TEXTS},
                **{f"perplexity_{t}": _ratio(ours["eval"][t]["perplexity_after"], theirs["eval"][t]["perplexity_after"]) for t in TEXTS},
                "quantize_s": _ratio(ours["quantize_s"], theirs["quantize_s"]),
            })
    return out


def table(result: dict) -> str:
    m, rows = result["machine"], result["rows"]
    first = next((r for r in rows if "error" not in r), None)
    lines = [
        f"Model: SmolLM2-135M-Instruct (squeeze built-in `{MODEL}`, fp32), every Linear layer but lm_head, groups of 64 "
        "input columns for every row. "
        f"Evaluation: {result['eval_tokens']:,} tokens ({SEQ_LEN}-token windows) of the Wikipedia and of the BBC news evaluation "
        "splits, scored by squeeze's compare_causal against the fp32 model for every row. "
        f"GPTQ calibration: {result['calib_samples']} windows x {SEQ_LEN} tokens of the Wikipedia calibration split; RTN and HQQ read no text.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 1024**3:.1f} GiB RAM, {m['os']}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}. Run {m['date']}, squeeze {result['squeeze_source']}.",
        "",
    ]
    if first is not None:
        lines += ["fp32 perplexity: " + ", ".join(f"{t} {first['eval'][t]['perplexity_before']:.3f}" for t in TEXTS) + ".", ""]
    lines += [
        "| tool | configuration | Wikipedia ppl | Δ | KL | top-1 | BBC ppl | Δ | KL | top-1 | bits/weight | quantize s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tool = r["tool"] if r["tool"] == "squeeze" else f"hqq {r.get('settings', {}).get('hqq', '')}".strip()
        if r["tool"] == f"{PEER}-int":
            tool += ", zero rounded"
        if "error" in r:
            lines.append(f"| {tool} | {r['label']} | failed: {r['error'].replace('|', '/')[:200]} | | | | | | | | | |")
            continue
        cells = [tool, r["label"]]
        for t in TEXTS:
            e = r["eval"][t]
            cells += [f"{e['perplexity_after']:.3f}", f"{100 * e['perplexity_change']:+.2f}%", f"{e['kl_divergence']:.4f}", f"{e['top1_agreement']:.3f}"]
        cells += [f"{r['bits_per_weight']:.2f}", f"{r['quantize_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if result["comparisons"]:
        lines += [
            "",
            "**squeeze HQQ ÷ the other row**, same scheme, same run (below 1 favours squeeze's HQQ):",
            "",
            "| scheme | versus | KL Wikipedia | KL BBC | ppl Wikipedia | ppl BBC | quantize time |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['scheme']} | {c['versus']} | {c['kl_wikipedia']} | {c['kl_bbc']} | {c['perplexity_wikipedia']} | {c['perplexity_bbc']} | {c['quantize_s']} |"
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
        row = worker(BY_NAME[args.worker], args.calib_samples, args.eval_tokens, args.out)
        args.result.write_text(json.dumps(row, indent=2) + "\n")
        return
    if args.render:
        write(json.loads(RESULTS.read_text()))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    source = snapshot_squeeze()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SNAPSHOT), os.environ.get("PYTHONPATH")]))
    notes = []
    peers = not args.no_peers and PEER_PYTHON.exists()
    if not args.no_peers and not PEER_PYTHON.exists():
        notes.append(f"hqq package skipped: {PEER_PYTHON.relative_to(REPO)} is missing; run benchmarks/peers/setup_hqq.sh.")
    rows: list[dict] = []
    partial = args.peers_only or args.only or args.no_peers
    previous = json.loads(RESULTS.read_text())["rows"] if partial and RESULTS.exists() else []
    for config in [BY_NAME[n] for n in args.only] if args.only else CONFIGS:
        for tool in ([] if args.peers_only else ["squeeze"]) + (list(config.peers) if peers else []):
            print(f"{tool} {config.name} ...", flush=True)
            rows.append(run(tool, config, args.calib_samples, args.eval_tokens))
            print(json.dumps({k: v for k, v in rows[-1].items() if k in ("tool", "config", "eval", "quantize_s", "error")}), flush=True)
            write(_result(args, source, merge_rows(previous, rows, list(BY_NAME)), notes))
    if previous:
        notes.append("rows from more than one invocation: see each row's load average and the run dates in the JSON")
    write(_result(args, source, merge_rows(previous, rows, list(BY_NAME)), notes))


def _result(args: argparse.Namespace, source: str, rows: list[dict], notes: list[str]) -> dict:
    words = dict(PACKAGE_ROWS)
    how = [f"{words.get(r['tool'], r['tool'])}, {r['label']}: {r['how']}" for r in rows if r["tool"] != "squeeze" and "how" in r]
    return {
        "benchmark": NAME,
        "model": MODEL,
        "texts": list(TEXTS),
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "calib_samples": args.calib_samples,
        "eval_tokens": args.eval_tokens,
        "squeeze_source": source,
        "machine": machine(),
        "rows": rows,
        "notes": [*notes, *STANDING_NOTES, *how],
    }


STANDING_NOTES = [
    "quantize s: squeeze, its report's quantize stage (plus calibrate for GPTQ); the hqq package, its quantize-and-dequantize "
    "loop over the layers. Model load, evaluation and saving excluded.",
    "Zero points: squeeze's formats (compressed-tensors, gptq) store integer zero points, so squeeze's HQQ keeps its zero "
    "points on the integer grid and fits the scale with them; the hqq package keeps a float16 zero point per group (its "
    "rows are fake-quantized in memory, no checkpoint; bits/weight counts hqq's own storage). The 'zero rounded' rows "
    "round the package's zero points to integers after its search: what hqq's result would be in squeeze's formats.",
    "SmolLM2 is squeeze's built-in conversion of a Q4_1 GGUF: its weights already sit on a 4-bit grid with a float offset "
    "per 32 weights. At W4 asymmetric a float zero point can partly follow those offsets and an integer one cannot, so "
    "that scheme measures the model's history as much as the method: see the package's two rows. The symmetric W4 rows "
    "(no zero point at all) and W3 (far from the source grid) measure the methods.",
    "The hqq package has no symmetric mode, so the symmetric rows compare squeeze's methods only.",
]

if __name__ == "__main__":
    main()
