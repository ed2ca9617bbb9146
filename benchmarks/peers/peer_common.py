"""What the calibrated-quantization peer scripts share: their CLI, squeeze's data, scoring and sizes.

Both peers (llm-compressor and GPTQModel, each in its own venv) are scored the same way, so the
rows of the benchmark differ only in who quantized: the same calibration token rows from squeeze,
the same evaluation windows on two texts, squeeze's ``compare_causal`` against an fp32 copy, and
the same byte count of the saved checkpoint's quantized Linear tensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from squeeze.data import calibration_windows, evaluation_windows
from squeeze.evaluate import compare_causal, peak_rss_bytes

MODEL = "smollm2"
CALIBRATION_TEXT = "wikipedia"
EVALUATION_TEXTS = ("wikipedia", "bbc")
BATCH_SIZE = 2
IGNORE = ["lm_head"]


def parse_args(description: str, configs: list[str], flags: dict[str, str] | None = None) -> argparse.Namespace:
    """The contract the benchmark runner calls every peer script with, plus the script's own
    boolean ``flags`` (name: help)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=configs)
    for flag, words in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=words)
    parser.add_argument("--calib-samples", type=int, required=True, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration and evaluation window")
    parser.add_argument("--eval-tokens", type=int, required=True, help="evaluation tokens per text")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the result row")
    return parser.parse_args()


def calibration_rows(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    """squeeze's own calibration windows, int64 [calib_samples, seq_len]."""
    return calibration_windows(tokenizer, CALIBRATION_TEXT, args.calib_samples, args.seq_len)


def evaluation_sets(tokenizer, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """squeeze's evaluation windows for each text, int64 [n, seq_len]."""
    return {text: evaluation_windows(tokenizer, text, args.seq_len, args.eval_tokens) for text in EVALUATION_TEXTS}


def score(cmp, windows: torch.Tensor) -> dict:
    """One text's accuracy fields from squeeze's ``CausalComparison`` on ``windows``."""
    return {
        "perplexity_before": cmp.reference_perplexity,
        "perplexity_after": cmp.perplexity,
        "perplexity_change": cmp.perplexity / cmp.reference_perplexity - 1,
        "kl_divergence": cmp.kl_divergence,
        "top1_agreement": cmp.top1_agreement,
        "eval_tokens": cmp.tokens,
        "eval_windows": int(windows.shape[0]),
    }


def evaluate(model: torch.nn.Module, reference: torch.nn.Module, sets: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """Per-text accuracy of ``model`` against ``reference``, and the seconds that took."""
    start = time.perf_counter()
    scores = {text: score(compare_causal(model, windows, reference, batch_size=BATCH_SIZE), windows) for text, windows in sets.items()}
    return scores, time.perf_counter() - start


def quantized_linears(model: torch.nn.Module) -> tuple[list[str], int, int]:
    """(names of the Linear layers a peer quantizes, their weight count, their fp32 weight bytes)."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] not in IGNORE}
    parameters = sum(m.weight.numel() for m in linear.values())
    size = sum(m.weight.numel() * m.weight.element_size() for m in linear.values())
    return list(linear), parameters, size


def checkpoint_bytes(folder: Path, quantized: set[str]) -> tuple[int, int]:
    """(bytes of all safetensors files, bytes of the quantized Linear layers' tensors in them, biases excluded)."""
    files = sorted(folder.glob("*.safetensors"))
    linear = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.rpartition(".")[0] in quantized and not key.endswith((".bias", ".weight_shape")):
                    t = f.get_tensor(key)
                    linear += t.numel() * t.element_size()
    return sum(p.stat().st_size for p in files), linear


def size_fields(folder: Path, names: list[str], parameters: int, linear_before: int) -> dict:
    """The size part of a result row, measured on the saved checkpoint."""
    disk, linear_after = checkpoint_bytes(folder, set(names))
    return {
        "checkpoint_bytes": disk,
        "linear_bytes_before": linear_before,
        "linear_bytes_after": linear_after,
        "linear_ratio": linear_after / linear_before,
        "bits_per_weight": 8 * linear_after / parameters,
    }


def write_result(path: Path, row: dict) -> None:
    row = {**row, "peak_rss_bytes": peak_rss_bytes()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")
