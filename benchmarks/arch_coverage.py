"""Architecture coverage: every method on a tiny random model of every architecture, and the real
non-Llama model squeeze can get offline (all-MiniLM-L6-v2, BERT) compressed by every method.

    python benchmarks/arch_coverage.py [--only-tiny] [--only-real] [--eval-tokens 8192]

Tiny models come from transformers' own config classes (squeeze.models.tiny: two blocks, hidden
64), so the coverage table measures what squeeze does with each architecture's structure, not
quality. For each architecture × method the cell shows the share of the blocks' weight matrices
that were compressed (every expert of a mixture-of-experts model counts as three matrices), or
why the method is refused for it. The folds column lists the producers squeeze.calib.folds found
and proved in block 0 (what AWQ and SmoothQuant scale through). The real-model table scores each
method on MiniLM against the fp32 original (mean-pooled embedding cosine on held-out text).

Results go to ``benchmarks/results/arch_coverage.json`` and to the two tables in
``benchmarks/README.md`` between the ``arch_coverage`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from quantize_rtn import BENCH, machine, publish, squeeze_source

from squeeze.api import prune, quantize
from squeeze.calib.blocks import block_stacks
from squeeze.calib.folds import find_folds
from squeeze.calib.pipeline import capture_block_inputs
from squeeze.errors import SqueezeError
from squeeze.linears import as_linear_layers
from squeeze.models.tiny import ARCHITECTURES, save_tiny_model, tiny_model
from squeeze.packages import MINILM
from squeeze.prune.config import PruneConfig
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.seq2seq import forward_inputs

NAME = "arch_coverage"
RESULTS = BENCH / "results" / f"{NAME}.json"
QUANTIZE = ("rtn", "gptq", "awq", "smoothquant", "hqq")
PRUNE = ("magnitude", "wanda", "sparsegpt")
SMALL = dict(data="shakespeare", eval_tokens=128, seq_len=32, calibration_samples=4, generation_prompts=0)


def _scheme(method: str, w8a8: bool = False):
    if method == "smoothquant" or w8a8:
        return scheme_from_options(bits=8, act="per-token")
    return scheme_from_options(mode="per-group", bits=4, group_size=32)


def _compress(model: str, out: Path, method: str, w8a8: bool = False, **run) -> object:
    if method in PRUNE:
        return prune(model, out, PruneConfig(method=method, format="dense"), **run)
    return quantize(model, out, QuantizeConfig(scheme=_scheme(method, w8a8), method=method), **run)


def _block_share(report, prefixes: list[str]) -> tuple[int, int]:
    """(compressed, all) weight matrices inside the blocks."""
    def inside(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in prefixes)

    compressed = sum(1 for layer in report.layers if inside(layer.name))
    left = sum(1 for name in report.uncompressed if inside(name))
    return compressed, compressed + left


def _folds(model) -> list[str]:
    """The folds proven in block 0 of each stack (an encoder-decoder's decoder's marked)."""
    ids = torch.randint(5, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    inputs = {"attention_mask": torch.ones_like(ids), **forward_inputs(model, ids)}
    names = []
    for stack, (prefix, blocks) in enumerate(block_stacks(model)):
        calls = capture_block_inputs(model, [inputs], stack=stack)
        found = find_folds(blocks[0], calls.first[0][0], calls.for_block(0)[0])
        names += [f"{'decoder: ' if stack else ''}{f.prev} ({f.kind})" for f in found.folds]
    return names


def tiny_rows(work: Path) -> list[dict]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM.root())
    rows = []
    for architecture in ARCHITECTURES:
        folder = save_tiny_model(architecture, work / architecture, tokenizer)
        row: dict = {"architecture": architecture, "cells": {}, "folds_block0": None}
        model = tiny_model(architecture, tokenizer.vocab_size)
        as_linear_layers(model)
        row["folds_block0"] = _folds(model)
        prefixes = [prefix for prefix, _ in block_stacks(model)]
        for method in QUANTIZE + PRUNE:
            out = work / f"{architecture}-{method}"
            start = time.perf_counter()
            try:
                report = _compress(str(folder), out, method, **SMALL)
                done, total = _block_share(report, prefixes)
                row["cells"][method] = {"compressed": done, "matrices": total, "seconds": round(time.perf_counter() - start, 2)}
            except SqueezeError as exc:
                row["cells"][method] = {"refused": str(exc).split(";")[0].replace(f"{work}/", "")}
                # a refusal that names W8A8 as what works: measure that too
                if method in ("rtn", "gptq") and "quantize W8A8 instead" in str(exc):
                    shutil.rmtree(out, ignore_errors=True)
                    report = _compress(str(folder), out, method, w8a8=True, **SMALL)
                    row["cells"][method]["instead"] = {"scheme": "W8A8", "compressed": _block_share(report, prefixes)[0]}
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(architecture, row["cells"], flush=True)
    return rows


def real_rows(work: Path, eval_tokens: int) -> list[dict]:
    rows = []
    for method in QUANTIZE + PRUNE:
        out = work / f"minilm-{method}"
        start = time.perf_counter()
        run = dict(data="wikipedia", eval_tokens=eval_tokens, seq_len=128, calibration_samples=64, generation_prompts=0)
        report = _compress("minilm", out, method, **run)
        accuracy = report.accuracy
        done, total = _block_share(report, ["encoder.layer"])
        rows.append({
            "model": "all-MiniLM-L6-v2",
            "method": method,
            "scheme": report.settings.get("scheme") if method in QUANTIZE else report.settings.get("structure", "50% unstructured"),
            "embedding_cosine_mean": accuracy.embedding_cosine_mean,
            "embedding_cosine_min": accuracy.embedding_cosine_min,
            "compressed": done,
            "matrices": total,
            "disk_ratio": report.size.disk_ratio,
            "seconds": round(time.perf_counter() - start, 1),
            "notes": [n for n in report.notes if "folded" in n or "skipped the fold" in n],
        })
        shutil.rmtree(out, ignore_errors=True)
        print(rows[-1], flush=True)
    return rows


def _cell(cell: dict) -> str:
    if "refused" in cell:
        instead = cell.get("instead")
        return f"refused; {instead['scheme']} {instead['compressed']}" if instead else "refused"
    return f"{cell['compressed']}/{cell['matrices']}"


def table(result: dict) -> str:
    methods = QUANTIZE + PRUNE
    lines = [
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}, "
        f"transformers {result['machine']['transformers']}, {result['created']}. squeeze {result['squeeze']}.",
        "",
        "Weight matrices of the blocks compressed, of all the blocks' weight matrices (tiny random models, 2 blocks; "
        "W4 g32 symmetric for rtn/gptq/awq/hqq, W8A8 per-token for smoothquant, 50% unstructured for pruning, "
        "default formats: compressed-tensors, and dense for pruning so that plain transformers loads it):",
        "",
        "| architecture | " + " | ".join(methods) + " | folds proven in block 0 (of each stack) |",
        "|---|" + "---|" * len(methods) + "---|",
    ]
    refusals: dict[str, list[str]] = {}
    for row in result.get("tiny", []):
        cells = []
        for method in methods:
            cell = row["cells"][method]
            cells.append(_cell(cell))
            if "refused" in cell:
                reason = re.sub(r"/tmp/arch-coverage-\w+/", "", cell["refused"])
                refusals.setdefault(reason, []).append(f"{row['architecture']} × {method}")
        # every expert folds alike: one entry for all of them
        folds = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", f) for f in row.get("folds_block0") or []))
        folds_text = ", ".join(folds) if folds else ("-" if row.get("folds_block0") is not None else "n/a")
        lines.append(f"| {row['architecture']} | " + " | ".join(cells) + f" | {folds_text} |")
    if refusals:
        lines += ["", "Refused cells, with the one-line reason squeeze gives before loading:", ""]
        lines += [f"- {', '.join(cells)}: {reason}" for reason, cells in refusals.items()]
    lines += [
        "",
        "A cell below its total means matrices the method cannot touch, each named in the report with why "
        "(mixture-of-experts routers are not Linear layers, T5's relative position biases are embeddings). "
        "\"refused; W8A8 n\": the W4 cell is refused and W8A8 with the same method, which the refusal suggests, "
        "compresses n matrices. Encoder-decoders (t5, bart) run both stacks block by block, the encoder first; "
        "their accuracy is the decoder's, teacher-forced on the second half of each window.",
    ]
    lines += [f"- {note}" for note in result.get("notes", [])]
    real = result.get("real", [])
    if real:
        lines += [
            "",
            f"Real non-Llama model: all-MiniLM-L6-v2 (BERT encoder, 22.7M), every method, scored on {result['eval_tokens']:,} "
            "held-out wikipedia tokens (128-token windows) against the fp32 original: cosine of the mean-pooled embeddings.",
            "",
            "| method | scheme / sparsity | embedding cosine mean | min | matrices compressed | disk ratio | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in real:
            lines.append(
                f"| {row['method']} | {row['scheme']} | {row['embedding_cosine_mean']:.4f} | {row['embedding_cosine_min']:.4f} | "
                f"{row['compressed']}/{row['matrices']} | {row['disk_ratio']:.2f}x | {row['seconds']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only-tiny", action="store_true")
    parser.add_argument("--only-real", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--render", action="store_true", help="only rebuild the README tables from the results JSON")
    args = parser.parse_args()
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.render:
        publish(previous, RESULTS, table(previous), NAME)
        return
    result = {
        "machine": machine(),
        "squeeze": squeeze_source(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "eval_tokens": args.eval_tokens,
        "tiny": previous.get("tiny", []),
        "real": previous.get("real", []),
    }
    with tempfile.TemporaryDirectory(prefix="arch-coverage-") as work:
        if not args.only_real:
            result["tiny"] = tiny_rows(Path(work))
        if not args.only_tiny:
            result["real"] = real_rows(Path(work), args.eval_tokens)
    publish(result, RESULTS, table(result), NAME)


if __name__ == "__main__":
    main()
