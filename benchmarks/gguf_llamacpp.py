"""GGUF files from squeeze against llama.cpp's own quantizer, scored and timed by llama.cpp itself.

    bash benchmarks/peers/setup_llamacpp.sh          # llama.cpp's tools, from llama-cpp-python's sdist
    bash scripts/setup.sh test,gptq,bnb,llamacpp     # the Python binding in .venv
    python benchmarks/gguf_llamacpp.py [--calib-samples 128] [--eval-tokens 4096] [--only ROW ... [--score-files]] [--no-speed]

Rows, every one a GGUF file of SmolLM2-135M with the embeddings (= the tied head) as Q8_0, so
that files of one type differ only in how their quantized layers were chosen:

- llama.cpp: ``llama-quantize`` from an F32 GGUF of the same weights squeeze starts from (the
  package's Q4_1 file requantized to F32, which is exact) to Q8_0, Q4_0, Q4_1 with
  ``--token-embedding-type q8_0 --output-tensor-type q8_0``; Q4_0 once more with an importance
  matrix (``llama-imatrix`` over the text of squeeze's calibration windows). On this tied-head
  model llama-quantize's own defaults give the same layout (embeddings Q8_0), byte for byte the
  size of the ``--token-embedding-type q8_0`` file; with the importance matrix it chooses Q4_1 for
  a few tensors, and the row keeps its choice.
- squeeze: ``squeeze quantize smollm2 --format gguf --gguf-embeddings q8_0`` with RTN, GPTQ and
  AWQ at group 32, written as Q4_0 (symmetric) and Q4_1 (asymmetric), AutoRound as Q4_0, and RTN
  W8 as Q8_0.

Perplexity is llama.cpp's: llama-cpp-python evaluates squeeze's evaluation windows of each text
(the same token ids for every row, ``--eval-tokens`` per text, 512-token windows) with every
position's logits, and the mean negative log-likelihood of each next token is taken over all of
them, as squeeze's own evaluation does. Top-1 agreement is against llama.cpp's F32 file. The
logit agreement section compares llama.cpp's logits with squeeze's dequantized model (the file
read back by squeeze) on two windows. Speed: ``llama-bench`` (512-token prompt, 128 decoded
tokens, 2 threads) on the Q8_0 and Q4_0 files beside ``squeeze bench-infer`` of squeeze's W8A8
(SmoothQuant, per-token activations) and W4A16 (GPTQ group 32) compressed-tensors checkpoints of
the same model, in the same run.

Results: benchmarks/results/gguf_llamacpp.json and the table between the ``gguf_llamacpp`` markers of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "work" / "gguf"
TOOLS = BENCH / "work" / "llamacpp" / "bin"
RESULTS = BENCH / "results" / "gguf_llamacpp.json"
SQUEEZE = [sys.executable, "-m", "squeeze.cli"]
TEXTS = ("wikipedia", "bbc")
SEQ_LEN = 512
THREADS = 2
Q8_KEPT = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
SQUEEZE_KEPT = ["--gguf-embeddings", "q8_0"]


@dataclass(frozen=True)
class Row:
    name: str
    tool: str  # "llama.cpp" or "squeeze"
    label: str
    gguf_type: str
    how: list[str]  # llama-quantize type and flags, or squeeze quantize options


ROWS = [
    Row("llamacpp-q8_0", "llama.cpp", "llama-quantize Q8_0", "q8_0", ["Q8_0", *Q8_KEPT]),
    Row("squeeze-rtn-q8_0", "squeeze", "RTN W8 g32 sym", "q8_0", ["--bits", "8"]),
    Row("llamacpp-q4_0", "llama.cpp", "llama-quantize Q4_0", "q4_0", ["Q4_0", *Q8_KEPT]),
    Row("llamacpp-q4_0-imatrix", "llama.cpp", "llama-quantize Q4_0, importance matrix", "q4_0", ["Q4_0", *Q8_KEPT, "imatrix"]),
    # llama-quantize's Q4_0 with an importance matrix stores the first n_layer/8 ffn_down in Q4_1 (on this model, whose
    # weights are Q4_1 blocks already, those come back exactly); --pure keeps every tensor Q4_0, like squeeze's file
    Row("llamacpp-q4_0-imatrix-pure", "llama.cpp", "llama-quantize Q4_0, importance matrix, --pure (every layer Q4_0)", "q4_0",
        ["Q4_0", "--pure", *Q8_KEPT, "imatrix"]),
    Row("squeeze-rtn-q4_0", "squeeze", "RTN W4 g32 sym", "q4_0", ["--bits", "4"]),
    Row("squeeze-gptq-q4_0", "squeeze", "GPTQ W4 g32 sym", "q4_0", ["--method", "gptq", "--bits", "4"]),
    Row("squeeze-awq-q4_0", "squeeze", "AWQ W4 g32 sym", "q4_0", ["--method", "awq", "--sym"]),
    Row("squeeze-autoround-q4_0", "squeeze", "AutoRound W4 g32 sym", "q4_0", ["--method", "autoround", "--bits", "4"]),
    Row("llamacpp-q4_1", "llama.cpp", "llama-quantize Q4_1", "q4_1", ["Q4_1", *Q8_KEPT]),
    Row("squeeze-rtn-q4_1", "squeeze", "RTN W4 g32 asym", "q4_1", ["--bits", "4", "--asym"]),
    Row("squeeze-gptq-q4_1", "squeeze", "GPTQ W4 g32 asym", "q4_1", ["--method", "gptq", "--bits", "4", "--asym"]),
    Row("squeeze-awq-q4_1", "squeeze", "AWQ W4 g32 asym", "q4_1", ["--method", "awq"]),
]
BY_NAME = {row.name: row for row in ROWS}
SPEED_FILES = {"Q8_0 (squeeze RTN W8)": WORK / "squeeze-rtn-q8_0" / "model.gguf", "Q4_0 (squeeze GPTQ W4)": WORK / "squeeze-gptq-q4_0" / "model.gguf"}
SPEED_FORMS = {  # squeeze's own runtime forms beside llama.cpp's files of the same width
    "w8a8": ["--method", "smoothquant", "--act", "per-token", "--calib-samples", "64"],
    "w4a16-g32": ["--method", "gptq", "--bits", "4", "--mode", "per-group", "--group-size", "32", "--calib-samples", "32"],
}


def tool(name: str) -> str:
    path = TOOLS / name
    if not path.exists():
        sys.exit(f"{path} is missing: run bash benchmarks/peers/setup_llamacpp.sh first")
    return str(path)


def sh(command: list[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; the wall seconds it took."""
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"}).returncode
    if code:
        sys.exit(f"failed ({code}): {' '.join(command)}; see {log}")
    return time.perf_counter() - start


def source_gguf() -> Path:
    from squeeze.packages import SMOLLM2

    files = sorted(Path(SMOLLM2.root()).glob("*.gguf"))
    return files[0]


def f32_gguf() -> Path:
    """The package's Q4_1 SmolLM2 requantized to F32 by llama.cpp: the weights squeeze loads, exactly."""
    out = WORK / "smollm2-f32.gguf"
    if not out.exists():
        sh([tool("llama-quantize"), "--allow-requantize", str(source_gguf()), str(out), "F32"], WORK / "f32.log")
    return out


def calibration_text(tokenizer, samples: int) -> Path:
    """squeeze's calibration windows as text, for llama-imatrix (which tokenizes it itself)."""
    from squeeze.data import calibration_windows

    out = WORK / f"calibration-{samples}.txt"
    if not out.exists():
        rows = calibration_windows(tokenizer, "wikipedia", samples, SEQ_LEN)
        out.write_text("\n".join(tokenizer.decode(row) for row in rows))
    return out


def build(row: Row, tokenizer, samples: int, rebuild: bool) -> tuple[Path, float]:
    """The row's GGUF file (made unless there and not ``rebuild``) and the wall seconds making it
    took (kept beside it in make_s.json, so a reused file keeps its time; the importance matrix's
    counted in the rows that use it)."""
    folder = WORK / row.name
    path = folder / "model.gguf"
    timing = folder / "make_s.json"
    if path.exists() and not rebuild:
        if timing.exists():
            return path, json.loads(timing.read_text())["seconds"]
        report = folder / "report.json"  # squeeze's own wall time, for a file made before make_s.json was kept
        return path, json.loads(report.read_text())["timings_s"]["total"] if report.exists() else 0.0
    shutil.rmtree(folder, ignore_errors=True)
    if row.tool == "squeeze":
        command = SQUEEZE + ["quantize", "smollm2", "--format", "gguf", "--mode", "per-group", "--group-size", "32", *SQUEEZE_KEPT,
                             *row.how, "--calib-samples", str(samples), "--no-eval", "-q", "--out", str(folder)]
        seconds = sh(command, WORK / f"{row.name}.log")
    else:
        folder.mkdir(parents=True)
        flags = [h for h in row.how[1:] if h != "imatrix"]
        seconds = 0.0
        if "imatrix" in row.how:
            matrix = WORK / f"imatrix-{samples}.gguf"
            matrix_timing = WORK / f"imatrix-{samples}.json"
            if not matrix.exists() or rebuild:
                matrix_s = sh([tool("llama-imatrix"), "-m", str(f32_gguf()), "-f", str(calibration_text(tokenizer, samples)), "-c", str(SEQ_LEN),
                               "--chunks", str(samples), "-t", str(THREADS), "-o", str(matrix)], WORK / "imatrix.log")
                matrix_timing.write_text(json.dumps({"seconds": matrix_s}))
            seconds += json.loads(matrix_timing.read_text())["seconds"] if matrix_timing.exists() else 0.0
            flags += ["--imatrix", str(matrix)]
        seconds += sh([tool("llama-quantize"), *flags, str(f32_gguf()), str(path), row.how[0], str(THREADS)], WORK / f"{row.name}.log")
    timing.write_text(json.dumps({"seconds": seconds, "load_average": os.getloadavg()[0]}))
    return path, seconds


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (log-softmax in float32, summed in float64), and the argmax of each position."""
    logp = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits[:-1])).float(), dim=-1)
    picked = logp[torch.arange(len(ids) - 1), torch.from_numpy(np.asarray(ids[1:]))]
    return float(-picked.double().sum()), logits[:-1].argmax(axis=-1)


def llamacpp_logits(path: Path):
    """A function: token ids -> llama.cpp's logits of every position (float32 [n, vocab])."""
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, n_ubatch=SEQ_LEN, logits_all=True, n_threads=THREADS, verbose=False)

    def run(ids: np.ndarray) -> np.ndarray:
        model.reset()
        model.eval(ids.tolist())
        return np.array(model.scores[: len(ids)], dtype=np.float32)

    return run, model


def score(logits_of, windows: dict[str, torch.Tensor], reference_top1: dict[str, list[np.ndarray]] | None) -> dict:
    """Per text: perplexity over every next token of every window, and top-1 agreement with the reference's argmax."""
    result = {}
    for text, rows in windows.items():
        total, count, agree, top1 = 0.0, 0, 0, []
        for i, row in enumerate(rows.numpy()):
            nll, argmax = next_token_nll(logits_of(row), row)
            total, count = total + nll, count + len(row) - 1
            top1.append(argmax)
            if reference_top1 is not None:
                agree += int((argmax == reference_top1[text][i]).sum())
        result[text] = {"perplexity": float(np.exp(total / count)), "tokens": count, "top1": top1}
        if reference_top1 is not None:
            result[text]["top1_agreement"] = agree / count
    return result


def logit_agreement(path: Path, windows: torch.Tensor, runtime) -> dict:
    """llama.cpp's logits against squeeze's model read back from the same file, on ``windows``."""
    from squeeze.models import load_model

    model = load_model(str(path.parent)).model.eval()
    diffs, kls, agree, count = [], [], 0, 0
    for row in windows:
        with torch.no_grad():
            ours = model(input_ids=row[None]).logits[0].double()
        theirs = torch.from_numpy(runtime(row.numpy())).double()
        diffs.append((ours - theirs).abs())
        p = torch.log_softmax(ours, -1)
        kls.append((p.exp() * (p - torch.log_softmax(theirs, -1))).sum(-1))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        count += row.numel()
    diff, kl = torch.cat(diffs), torch.cat(kls)
    return {
        "windows": int(windows.shape[0]), "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
        "logit_std": float(torch.cat([torch.from_numpy(runtime(r.numpy())) for r in windows[:1]]).std()),
        "kl_squeeze_to_llamacpp": float(kl.mean()), "top1_agreement": agree / count,
    }


def speed(paths: dict[str, Path], rebuild: bool) -> dict:
    """llama-bench on GGUF files and squeeze bench-infer on squeeze's own W8A8 / W4A16 forms, one after the other."""
    result: dict = {"llama.cpp": {}, "squeeze": {}}
    for name, path in paths.items():
        out = subprocess.run([tool("llama-bench"), "-m", str(path), "-p", "512", "-n", "128", "-t", str(THREADS), "-r", "3", "-o", "json"],
                             capture_output=True, text=True, check=True).stdout
        tests = json.loads(out)
        result["llama.cpp"][name] = {
            "prefill_tokens_per_s": next(t["avg_ts"] for t in tests if t["n_prompt"] > 0),
            "decode_tokens_per_s": next(t["avg_ts"] for t in tests if t["n_gen"] > 0),
            "file_bytes": path.stat().st_size, "build": tests[0].get("build_commit"),
        }
    folders = []
    for name, options in SPEED_FORMS.items():
        folder = WORK / f"runtime-{name}"
        if rebuild or not (folder / "report.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            sh(SQUEEZE + ["quantize", "smollm2", *options, "--no-eval", "-q", "--out", str(folder)], WORK / f"runtime-{name}.log")
        folders.append(folder)
    report = WORK / "bench-infer.json"
    report.unlink(missing_ok=True)
    sh(SQUEEZE + ["bench-infer", "smollm2", *sum((["--compare", str(f)] for f in folders), []), "--no-bf16", "--prompts", "0",
                  "--repeats", "3", "--out", str(report)], WORK / "bench-infer.log")
    for form in json.loads(report.read_text())["forms"]:
        result["squeeze"][form["label"]] = {
            "prefill_tokens_per_s": form["prefill_tokens_per_s"], "decode_tokens_per_s": form["decode_tokens_per_s"],
            "weight_bytes": form["weight_bytes"], "runs_on": form["runs_on"],
        }
    return result


def table(result: dict) -> str:
    rows = result["rows"]
    ref = result["f32"]
    lines = [
        f"SmolLM2-135M; perplexity computed by llama.cpp ({result['llamacpp']}) on squeeze's evaluation windows "
        f"({result['eval_tokens']} tokens of each text, {SEQ_LEN}-token windows); embeddings (= tied head) Q8_0 in every row. "
        f"{result['machine']}; measured {result['measured']} at {result['commit']}.",
        "",
        f"F32 GGUF in llama.cpp: wikipedia {ref['wikipedia']['perplexity']:.3f}, bbc {ref['bbc']['perplexity']:.3f} "
        f"(squeeze's fp32 model on the same windows: {result['squeeze_fp32']['wikipedia']:.3f}, {result['squeeze_fp32']['bbc']:.3f}).",
        "",
        "| type | tool | how | Wikipedia ppl | Δ vs F32 | top-1 vs F32 | BBC ppl | Δ vs F32 | top-1 vs F32 | file MiB | ratio to llama.cpp's file | make s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = next((p for p in rows if p["name"] == f"llamacpp-{r['gguf_type']}"), None)  # the size reference: llama.cpp's file of that type
        cells = []
        for text in TEXTS:
            s = r["scores"][text]
            cells += [f"{s['perplexity']:.3f}", f"{s['perplexity'] / ref[text]['perplexity'] - 1:+.2%}", f"{s['top1_agreement']:.2%}"]
        size = f"{r['file_bytes'] / r_bytes:.3f}x" if peer and (r_bytes := peer["file_bytes"]) else "-"
        lines.append(f"| {r['gguf_type'].upper()} | {r['tool']} | {r['label']} | " + " | ".join(cells)
                     + f" | {r['file_bytes'] / 2**20:.1f} | {size} | {r['make_s']:.0f} |")
    older = sorted({(r["measured"], r["commit"]) for r in rows if r.get("measured") not in (None, result["measured"])})
    for when, at in older:
        lines += ["", f"Rows kept from the run of {when} at {at}: "
                  + ", ".join(r["name"] for r in rows if r.get("measured") == when) + "."]
    lines += ["", "make s: wall seconds to make the file (the importance matrix's included in its row), measured while other jobs "
              "shared the 2 cores: not a speed comparison. Q4_1 on this model: the package's weights are Q4_1 blocks already, so "
              "llama-quantize's Q4_1 (a float16 minimum per block) gives them back almost exactly, while squeeze's asymmetric grid "
              "(an integer zero point, so that 0 is exact) cannot.", ""]
    lines += [*targets(result), ""]
    agreement = result.get("logit_agreement")
    if agreement:
        lines.append("**llama.cpp against squeeze's dequantized model**, same file, same windows:")
        lines.append("")
        lines.append("| file | windows | max abs logit diff | mean abs logit diff | KL squeeze→llama.cpp | top-1 agreement |")
        lines.append("|---|---|---|---|---|---|")
        for name, a in agreement.items():
            lines.append(f"| {name} | {a['windows']} | {a['max_abs_logit_diff']:.4f} | {a['mean_abs_logit_diff']:.4f} | "
                         f"{a['kl_squeeze_to_llamacpp']:.2e} | {a['top1_agreement']:.2%} |")
        lines.append("")
    sp = result.get("speed")
    if not sp:
        lines += ["Inference speed (llama-bench beside `squeeze bench-infer`): not measured in this run; "
                  "`python benchmarks/gguf_llamacpp.py --speed-only` measures it on a quiet machine.", ""]
    if sp:
        lines += [f"**Inference speed on this CPU**, measured {result.get('speed_measured', result['measured'])} with nothing else running "
                  "(512-token prompt, 128 decoded tokens, 2 threads; llama-bench's mean of 3, bench-infer's best of 3):", "",
                  "| runtime | form | prefill tok/s | decode tok/s |", "|---|---|---|---|"]
        for name, s in sp["llama.cpp"].items():
            lines.append(f"| llama.cpp | {name} | {s['prefill_tokens_per_s']:,.0f} | {s['decode_tokens_per_s']:,.1f} |")
        for name, s in sp["squeeze"].items():
            lines.append(f"| squeeze bench-infer | {name} ({s['runs_on']}) | {s['prefill_tokens_per_s']:,.0f} | {s['decode_tokens_per_s']:,.1f} |")
        for ours, theirs in (("W8A8", "Q8_0"), ("W4A16", "Q4_0")):
            mine = next((s for n, s in sp["squeeze"].items() if n.startswith(ours)), None)
            peer = next((s for n, s in sp["llama.cpp"].items() if n.startswith(theirs)), None)
            if mine and peer:
                lines.append("")
                lines.append(f"squeeze {ours} ÷ llama.cpp {theirs}: prefill {mine['prefill_tokens_per_s'] / peer['prefill_tokens_per_s']:.2f}x, "
                             f"decode {mine['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}x.")
    return "\n".join(lines) + "\n"


# the issue names GPTQ and AWQ; AutoRound (#19) chooses codes from calibration text too
CALIBRATED_Q4_0 = ("squeeze-gptq-q4_0", "squeeze-awq-q4_0", "squeeze-autoround-q4_0")


def targets(result: dict) -> list[str]:
    """The issue's targets, met or not, with the numbers."""
    rows = {r["name"]: r for r in result["rows"]}
    out = ["| target | numbers | verdict |", "|---|---|---|"]
    best = [rows[n] for n in CALIBRATED_Q4_0 if n in rows]
    peers = [("llama.cpp's Q4_0 (with imatrix)", rows.get("llamacpp-q4_0-imatrix") or rows.get("llamacpp-q4_0")),
             ("llama.cpp's pure Q4_0 with imatrix (not the issue's target)", rows.get("llamacpp-q4_0-imatrix-pure"))]
    for what, peer in peers:
        if not (best and peer):
            continue
        words, ok = [], True
        for text in TEXTS:
            mine = min(best, key=lambda r: r["scores"][text]["perplexity"])
            a, b = mine["scores"][text]["perplexity"], peer["scores"][text]["perplexity"]
            ok &= a <= b
            words.append(f"{text}: {mine['label']} {a:.3f} vs {peer['label']} {b:.3f}")
        out.append(f"| squeeze GPTQ, AWQ or AutoRound Q4_0 ≤ {what}, both texts | {'; '.join(words)} | {'pass' if ok else '**FAIL**'} |")
    for kind in ("q8_0", "q4_0", "q4_1"):
        theirs = rows.get(f"llamacpp-{kind}")
        mine = [r for r in result["rows"] if r["tool"] == "squeeze" and r["gguf_type"] == kind]
        if theirs and mine:
            worst = max(abs(r["file_bytes"] / theirs["file_bytes"] - 1) for r in mine)
            out.append(f"| {kind.upper()} files within 1% of llama.cpp's size | largest difference {worst:.3%} | {'pass' if worst <= 0.01 else '**FAIL**'} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--only", nargs="*", choices=list(BY_NAME), help="rows to (re)make and score; the others keep their last measurements")
    parser.add_argument("--score-files", action="store_true",
                        help="with --only: score the rows' files already made (benchmarks/work/gguf/ROW/model.gguf) instead of making them again")
    parser.add_argument("--rebuild", action="store_true", help="make the files again")
    parser.add_argument("--no-speed", action="store_true", help="leave the speed measurement out (keeps the last one)")
    parser.add_argument("--speed-only", action="store_true", help="measure speed again on a quiet machine; keep the quality rows")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import llama_cpp
    from datetime import datetime, timezone

    from squeeze.bench import commit, replace_section
    from squeeze.data import evaluation_windows
    from squeeze.device import cpu_name
    from squeeze.models import load_model

    WORK.mkdir(parents=True, exist_ok=True)
    if args.speed_only:
        result = json.loads(RESULTS.read_text())
        result["speed"] = speed(SPEED_FILES, args.rebuild)
        result["speed_measured"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        replace_section(BENCH / "README.md", "gguf_llamacpp", table(result))
        print(table(result))
        return
    loaded = load_model("smollm2")
    tokenizer = loaded.tokenizer
    windows = {text: evaluation_windows(tokenizer, text, SEQ_LEN, args.eval_tokens) for text in TEXTS}
    squeeze_fp32 = {}
    for text, rows in windows.items():
        total = 0.0
        for row in rows:
            with torch.no_grad():
                logits = loaded.model(input_ids=row[None]).logits[0].numpy()
            total += next_token_nll(logits, row.numpy())[0]
        squeeze_fp32[text] = float(np.exp(total / (rows.shape[0] * (SEQ_LEN - 1))))
    del loaded

    runtime, handle = llamacpp_logits(f32_gguf())
    f32 = score(runtime, windows, None)
    handle.close()
    reference_top1 = {text: f32[text].pop("top1") for text in TEXTS}
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    previous = {r["name"]: {"measured": earlier.get("measured"), "commit": earlier.get("commit"), **r} for r in earlier["rows"]}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    for row in ROWS:
        remake = args.rebuild or (args.only is not None and row.name in args.only and not args.score_files)
        if args.only is not None and row.name not in args.only and row.name in previous:
            rows.append(previous[row.name])  # its measurements, kept with their date and commit (its file may be gone)
            continue
        path, seconds = build(row, tokenizer, args.calib_samples, remake)
        runtime, handle = llamacpp_logits(path)
        scores = score(runtime, windows, reference_top1)
        handle.close()
        for text in TEXTS:
            scores[text].pop("top1")
        rows.append({"name": row.name, "tool": row.tool, "label": row.label, "gguf_type": row.gguf_type, "how": row.how,
                     "file_bytes": path.stat().st_size, "make_s": seconds, "scores": scores, "measured": now, "commit": commit(REPO)})
        print(row.name, {t: round(scores[t]["perplexity"], 3) for t in TEXTS}, flush=True)

    agreement = dict(earlier.get("logit_agreement", {}))  # a file not made again keeps its last measurement
    for name in ("squeeze-gptq-q4_0", "squeeze-rtn-q8_0"):
        path = WORK / name / "model.gguf"
        if path.exists():
            runtime, handle = llamacpp_logits(path)
            agreement[name] = logit_agreement(path, windows["wikipedia"][:2], runtime)
            handle.close()
    result = {
        "measured": now, "commit": commit(REPO),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "llamacpp": f"llama-cpp-python {llama_cpp.__version__}", "eval_tokens": args.eval_tokens, "calib_samples": args.calib_samples,
        "f32": f32, "squeeze_fp32": squeeze_fp32, "rows": rows, "logit_agreement": agreement,
    }
    if not args.no_speed:
        result["speed"] = speed(SPEED_FILES, args.rebuild)
        result["speed_measured"] = result["measured"]
    elif RESULTS.exists() and "speed" in json.loads(RESULTS.read_text()):
        kept = json.loads(RESULTS.read_text())
        # the speed kept keeps its own date: the run that measured it, not this one
        result["speed"], result["speed_measured"] = kept["speed"], kept.get("speed_measured", kept["measured"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    replace_section(BENCH / "README.md", "gguf_llamacpp", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
