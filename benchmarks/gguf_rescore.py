"""Score gguf_llamacpp's files again with llama.cpp on a different amount of text, to see how far
the perplexity order between rows depends on the evaluation text.

    python benchmarks/gguf_rescore.py [--eval-tokens 16384] [--rows NAME ...]

Uses the files benchmarks/gguf_llamacpp.py made (benchmarks/work/gguf/ROW/model.gguf) and its
scoring: squeeze's evaluation windows of each text, every next token's log-likelihood under
llama.cpp's logits, top-1 agreement with llama.cpp's F32 file. Writes
benchmarks/results/gguf_rescore_<tokens>.json and the table between the ``gguf_rescore`` markers of
benchmarks/README.md (``--table-only``: the table from the last results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

import gguf_llamacpp as bench

DEFAULT_ROWS = ["llamacpp-q4_0", "llamacpp-q4_0-imatrix", "llamacpp-q4_0-imatrix-pure", "squeeze-gptq-q4_0", "squeeze-awq-q4_0"]


def table(result: dict) -> str:
    """The rescored rows beside their scores in gguf_llamacpp's own run (its --eval-tokens)."""
    first = json.loads(bench.RESULTS.read_text())
    before = {r["name"]: r for r in first["rows"]}
    n, m = result["eval_tokens"], first["eval_tokens"]
    lines = [
        f"llama.cpp's perplexity and top-1 agreement with its F32 file on {n:,} tokens of each text, beside the same files "
        f"on {m:,} tokens in gguf_llamacpp's run. {result['machine']}; measured {result['measured']} at {result['commit']}. "
        f"F32: Wikipedia {result['f32']['wikipedia']['perplexity']:.3f}, BBC {result['f32']['bbc']['perplexity']:.3f}.",
        "",
        f"| file | Wikipedia ppl ({n:,}) | top-1 | Wikipedia ppl ({m:,}) | BBC ppl ({n:,}) | top-1 | BBC ppl ({m:,}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, scores in result["rows"].items():
        cells = []
        for text in bench.TEXTS:
            old = before.get(name, {}).get("scores", {}).get(text, {}).get("perplexity")
            cells += [f"{scores[text]['perplexity']:.3f}", f"{scores[text]['top1_agreement']:.2%}", f"{old:.3f}" if old else "-"]
        lines.append(f"| {before.get(name, {}).get('label', name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=list(bench.BY_NAME))
    parser.add_argument("--table-only", action="store_true", help="rewrite the README table from the last results")
    args = parser.parse_args()
    sys.path.insert(0, str(bench.REPO))
    from squeeze.bench import commit, replace_section

    out = bench.BENCH / "results" / f"gguf_rescore_{args.eval_tokens}.json"
    if args.table_only:
        replace_section(bench.BENCH / "README.md", "gguf_rescore", table(json.loads(out.read_text())))
        return
    missing = [r for r in args.rows if not (bench.WORK / r / "model.gguf").exists()]
    if missing:
        raise SystemExit(f"not made yet: {', '.join(missing)}; run benchmarks/gguf_llamacpp.py first")

    from squeeze.data import evaluation_windows
    from squeeze.device import cpu_name
    from squeeze.models import load_model

    tokenizer = load_model("smollm2").tokenizer
    windows = {text: evaluation_windows(tokenizer, text, bench.SEQ_LEN, args.eval_tokens) for text in bench.TEXTS}
    runtime, handle = bench.llamacpp_logits(bench.f32_gguf())
    f32 = bench.score(runtime, windows, None)
    handle.close()
    reference_top1 = {text: f32[text].pop("top1") for text in bench.TEXTS}
    rows = {}
    for name in args.rows:
        runtime, handle = bench.llamacpp_logits(bench.WORK / name / "model.gguf")
        scores = bench.score(runtime, windows, reference_top1)
        handle.close()
        for text in bench.TEXTS:
            scores[text].pop("top1")
        rows[name] = scores
        print(name, {t: round(scores[t]["perplexity"], 3) for t in bench.TEXTS}, flush=True)
    result = {
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(bench.REPO),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores", "eval_tokens": args.eval_tokens, "f32": f32, "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    replace_section(bench.BENCH / "README.md", "gguf_rescore", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
