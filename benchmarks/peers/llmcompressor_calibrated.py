"""llm-compressor's calibrated post-training quantization (GPTQ, AWQ, SmoothQuant) on SmolLM2.

    benchmarks/peers/.venv/bin/python benchmarks/peers/llmcompressor_calibrated.py CONFIG \
        --calib-samples N --seq-len 512 --eval-tokens T --out DIR --result JSON

Runs in the peers venv (benchmarks/peers/setup.sh), one configuration per process so that peak RSS
is that configuration's own. It loads the same fp32 weights squeeze uses, hands squeeze's own
calibration token rows to ``oneshot`` (timed; no shuffling, no re-tokenizing), scores the model as
oneshot leaves it in memory (fake-quant) against an fp32 copy with squeeze's ``compare_causal`` on
squeeze's evaluation windows of two texts, then saves with ``save_compressed=True`` and measures
the checkpoint. Writes one JSON object to ``--result``.

RTN and plain W8A8 get no calibration data: their weight observer is min-max and their activations
are quantized per token at run time, so data would only add a forward pass that changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import torch

from peer_common import IGNORE, MODEL, calibration_rows, evaluate, evaluation_sets, parse_args, quantized_linears, size_fields, write_result
from squeeze.models import load_model

CONFIGS = [
    "rtn-w4-per-channel",
    "rtn-w4-g64",
    "gptq-w4-per-channel",
    "gptq-w4-g64",
    "awq-w4-per-channel",
    "awq-w4-g64",
    "w8a8",
    "smoothquant-a0.5",
    "smoothquant-a0.8",
]


def int4_weights(config: str) -> dict:
    """config_groups for symmetric int4 weights, per output channel or in groups of 64 inputs; no activations."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False}
    # SmolLM2's 576-wide inputs need group 64; the W4A16 preset is group-128.
    weights |= {"strategy": "group", "group_size": 64} if config.endswith("-g64") else {"strategy": "channel"}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def recipe(config: str, architecture: str) -> tuple[list, dict, bool]:
    """(modifiers, the arguments that define them beyond the scheme, whether they need calibration data)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQ_MAPPING_REGISTRY, AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform.smoothquant.utils import MAPPINGS_REGISTRY

    if config.startswith("rtn-"):
        return [QuantizationModifier(ignore=IGNORE, config_groups=int4_weights(config))], {}, False
    if config.startswith("gptq-"):
        gptq = GPTQModifier(ignore=IGNORE, config_groups=int4_weights(config))  # its defaults otherwise
        arguments = {"block_size": gptq.block_size, "dampening_frac": gptq.dampening_frac, "actorder": str(gptq.actorder)}
        return [gptq], arguments, True
    if config.startswith("awq-"):
        # AWQ is a transform in 0.14: it rescales channels against the scheme the QuantizationModifier
        # after it attaches, then that modifier rounds the weights.
        mappings = AWQ_MAPPING_REGISTRY[architecture]
        awq = AWQModifier(mappings=mappings)
        arguments = {
            "mappings": [dataclasses.asdict(m) for m in mappings],
            "duo_scaling": awq.duo_scaling,
            "n_grid": awq.n_grid,
        }
        return [awq, QuantizationModifier(ignore=IGNORE, config_groups=int4_weights(config))], arguments, True
    w8a8 = QuantizationModifier(targets=["Linear"], ignore=IGNORE, scheme="W8A8")
    if config == "w8a8":
        return [w8a8], {}, False
    alpha = float(config.removeprefix("smoothquant-a"))
    mappings = MAPPINGS_REGISTRY[architecture]
    smooth = SmoothQuantModifier(smoothing_strength=alpha, mappings=mappings)
    arguments = {
        "smoothing_strength": alpha,
        "mappings": [{"balance_layers": list(m.balance_layers), "smooth_layer": m.smooth_layers} for m in mappings],
    }
    return [smooth, w8a8], arguments, True


def skip_pinning_without_accelerator() -> bool:
    """Make llm-compressor's activation-cache pinning a no-op on a machine with no accelerator; True if it did.

    AWQ in 0.14 pins its cached activations before each grid search, unconditionally, and torch
    refuses to pin memory when there is no accelerator. Pinning only speeds host-to-device copies,
    so skipping it changes no number.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def calibration_dataset(rows: torch.Tensor):
    """squeeze's token rows as the already-tokenized Dataset oneshot takes as it is."""
    from datasets import Dataset

    ids = rows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def describe(config: str, arguments: dict, weights: dict, calibration_tokens: int) -> str:
    """One sentence saying exactly what ran."""
    layout = f"group-{weights['group_size']}" if weights.get("group_size") else f"per-{weights.get('strategy')}"
    scheme = f"int{weights.get('num_bits')} {'symmetric' if weights.get('symmetric') else 'asymmetric'} {layout}"
    data = f"on {calibration_tokens} calibration tokens (squeeze's rows, unshuffled)" if calibration_tokens else "with no calibration data"
    if config.startswith("rtn-"):
        what = f"oneshot(QuantizationModifier, {scheme} weights, min-max observer)"
    elif config.startswith("gptq-"):
        what = (
            f"oneshot(GPTQModifier, {scheme} weights, block_size {arguments['block_size']}, "
            f"dampening_frac {arguments['dampening_frac']}, actorder {arguments['actorder']})"
        )
    elif config.startswith("awq-"):
        what = (
            f"oneshot([AWQModifier(LlamaForCausalLM registry mappings, duo_scaling {arguments['duo_scaling']}, "
            f"n_grid {arguments['n_grid']}), QuantizationModifier({scheme} weights)])"
        )
        if arguments.get("pinning_skipped"):
            what += " (its activation-cache pin_memory patched to a no-op: 0.14 pins unconditionally, which fails without an accelerator)"
    else:
        smooth = ""
        if arguments:
            smooth = f"SmoothQuantModifier(smoothing_strength {arguments['smoothing_strength']}, LlamaForCausalLM registry mappings), "
        what = f"oneshot([{smooth}QuantizationModifier(W8A8: int8 symmetric per-channel weights, dynamic per-token int8 activations)])"
    return (
        f"llm-compressor {what} {data}, lm_head kept, scored in memory (fake-quant) by squeeze's compare_causal "
        "against an fp32 copy, then saved with save_compressed=True; quantize_s is the oneshot call."
    )


def main() -> None:
    args = parse_args(__doc__, CONFIGS)

    import llmcompressor
    from llmcompressor import oneshot

    import squeeze

    print(f"squeeze imported from {squeeze.__file__}", flush=True)

    loaded = load_model(MODEL)  # squeeze's loader: same fp32 weights and tokenizer as squeeze's runs
    model, tokenizer = loaded.model, loaded.tokenizer
    modifiers, arguments, calibrated = recipe(args.config, type(model).__name__)
    if args.config.startswith("awq-") and skip_pinning_without_accelerator():
        arguments["pinning_skipped"] = True
    sets = evaluation_sets(tokenizer, args)
    data, calibration_tokens = {}, 0
    if calibrated:
        rows = calibration_rows(tokenizer, args)
        calibration_tokens = int(rows.numel())
        data = dict(
            dataset=calibration_dataset(rows),
            num_calibration_samples=rows.shape[0],
            max_seq_length=args.seq_len,
            shuffle_calibration_samples=False,
        )
    reference = copy.deepcopy(model)
    names, parameters, linear_before = quantized_linears(model)

    start = time.perf_counter()
    model = oneshot(model=model, tokenizer=tokenizer, recipe=modifiers, **data)
    quantize_s = time.perf_counter() - start

    scores, evaluate_s = evaluate(model, reference, sets)
    del reference

    start = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    save_s = time.perf_counter() - start
    config = json.loads((args.out / "config.json").read_text()).get("quantization_config", {})
    groups = config.get("config_groups", {})
    weights = next(iter(groups.values()), {}).get("weights") or {}

    write_result(
        args.result,
        {
            "scheme": json.dumps({k: {"weights": v.get("weights"), "input_activations": v.get("input_activations")} for k, v in groups.items()}),
            "format": config.get("format"),
            "eval": scores,
            **size_fields(args.out, names, parameters, linear_before),
            "calibration_tokens": calibration_tokens,
            "quantize_s": quantize_s,
            "timings_s": {"oneshot": quantize_s, "evaluate": evaluate_s, "save": save_s},
            "arguments": arguments,
            "llmcompressor_version": llmcompressor.__version__,
            "how": describe(args.config, arguments, weights, calibration_tokens),
        },
    )


if __name__ == "__main__":
    main()
