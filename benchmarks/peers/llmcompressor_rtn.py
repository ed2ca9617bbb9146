"""llm-compressor's round-to-nearest (one-shot QuantizationModifier, no calibration data) on SmolLM2.

    benchmarks/peers/.venv/bin/python benchmarks/peers/llmcompressor_rtn.py CONFIG --out DIR --result JSON [--eval-tokens N]

Runs in the peers venv (benchmarks/peers/setup.sh), one configuration per process so that peak RSS
is that configuration's own. It loads the same fp32 weights squeeze uses, applies
``QuantizationModifier`` through ``oneshot`` (timed), scores the model as oneshot leaves it in memory
(fake-quant: weights rounded to the grid and held dequantized, activations quantized at run time by
compressed-tensors' forward wrapper) against the unquantized model with squeeze's own
``compare_causal`` on squeeze's evaluation windows, then saves with ``save_compressed=True`` and
measures the checkpoint. Writes one JSON object to ``--result``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from peer_common import checkpoint_bytes, score
from squeeze.data import evaluation_windows
from squeeze.evaluate import compare_causal, peak_rss_bytes
from squeeze.models import load_model

MODEL = "smollm2"
DATA = "wikipedia"
SEQ_LEN = 512
BATCH_SIZE = 2
IGNORE = ["lm_head"]


def _weights_only(num_bits: int, strategy: str, group_size: int | None = None) -> dict:
    """A config_groups entry: symmetric integer weights, no activation quantization."""
    weights = {"num_bits": num_bits, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": False}
    if group_size is not None:
        weights["group_size"] = group_size
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def modifier(config: str):
    """The QuantizationModifier for one of the benchmark's configuration names."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if config == "w8a8":
        # The preset: int8 per-channel symmetric weights, int8 dynamic per-token activations.
        return QuantizationModifier(targets=["Linear"], ignore=IGNORE, scheme="W8A8")
    if config == "w8-per-channel":
        # llm-compressor's W8A16 preset is group-128, so per-channel needs an explicit scheme.
        return QuantizationModifier(ignore=IGNORE, config_groups=_weights_only(8, "channel"))
    if config == "w4-g64":
        # W4A16 is group-128; SmolLM2's 576-wide inputs need group 64.
        return QuantizationModifier(ignore=IGNORE, config_groups=_weights_only(4, "group", 64))
    raise SystemExit(f"unknown configuration {config!r}; use w8a8, w8-per-channel or w4-g64")


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] not in IGNORE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()

    import llmcompressor
    from llmcompressor import oneshot

    import squeeze

    print(f"squeeze imported from {squeeze.__file__}", flush=True)

    recipe = modifier(args.config)
    loaded = load_model(MODEL)  # squeeze's loader: same fp32 weights and tokenizer as squeeze's runs
    model = loaded.model
    windows = evaluation_windows(loaded.tokenizer, DATA, SEQ_LEN, args.eval_tokens)
    reference = copy.deepcopy(model)
    names = _linear_names(model)
    linear = [m for n, m in model.named_modules() if n in set(names)]
    parameters = sum(m.weight.numel() for m in linear)
    linear_before = sum(m.weight.numel() * m.weight.element_size() for m in linear)
    del linear

    start = time.perf_counter()
    model = oneshot(model=model, recipe=recipe)
    quantize_s = time.perf_counter() - start

    start = time.perf_counter()
    cmp = compare_causal(model, windows, reference, batch_size=BATCH_SIZE)
    evaluate_s = time.perf_counter() - start
    del reference

    start = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    save_s = time.perf_counter() - start
    disk, linear_after = checkpoint_bytes(args.out, set(names))
    config = json.loads((args.out / "config.json").read_text()).get("quantization_config", {})
    groups = config.get("config_groups", {})

    row = {
        "scheme": json.dumps({k: {"weights": v.get("weights"), "input_activations": v.get("input_activations")} for k, v in groups.items()}),
        "format": config.get("format"),
        **score(cmp, windows),
        "checkpoint_bytes": disk,
        "linear_bytes_before": linear_before,
        "linear_bytes_after": linear_after,
        "linear_ratio": linear_after / linear_before,
        "bits_per_weight": 8 * linear_after / parameters,
        "quantize_s": quantize_s,
        "timings_s": {"oneshot": quantize_s, "evaluate": evaluate_s, "save": save_s},
        "peak_rss_bytes": peak_rss_bytes(),
        "llmcompressor_version": llmcompressor.__version__,
        "how": (
            "llm-compressor rows: oneshot(QuantizationModifier) with no calibration data (RTN, min-max weight "
            "observer), scored by squeeze's compare_causal on the same windows as the model oneshot leaves in "
            "memory (fake-quant; activations quantized per token at run time), then saved with "
            "save_compressed=True; quantize s is the oneshot call."
        ),
    }
    args.result.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
