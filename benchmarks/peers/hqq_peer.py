"""The hqq package's row of benchmarks/quantize_hqq.py: fake-quantize SmolLM2 with hqq's own quantizer.

    benchmarks/peers/.venv-hqq/bin/python benchmarks/peers/hqq_peer.py hqq-w4-g64 [--integer-zero] --calib-samples 32 --eval-tokens 4096 --out DIR --result ROW.json

Runs in benchmarks/peers/.venv-hqq (``setup_hqq.sh``). Every targeted Linear weight of the same fp32
model squeeze quantizes (all but lm_head) goes through ``hqq.core.quantize.Quantizer.quantize``
with hqq's defaults for weights (``optimize=True``: the proximal solver of the HQQ paper, lp norm
0.7, beta 10, kappa 1.01, at most 20 steps, early stopping; ``axis=1``: groups along the input
dimension, as squeeze's) at the same bits and group size, and is replaced by its dequantized
value. hqq keeps a float zero point per group; with ``--integer-zero`` that zero point is rounded
to the nearest integer before dequantizing (codes re-rounded for it), which is what storing hqq's
result in an integer-zero format (compressed-tensors, gptq) would give. Only that loop is timed. The model is scored with squeeze's ``compare_causal`` against an
fp32 copy on the same evaluation windows as squeeze's rows. hqq needs no calibration text, so
``--calib-samples`` is accepted for the runner's contract and unused; no checkpoint is written.
"""

from __future__ import annotations

import copy
import importlib.metadata
import time

import torch
from hqq.core.quantize import Quantizer

from peer_common import MODEL, evaluate, evaluation_sets, parse_args, quantized_linears, write_result
from squeeze.models import load_model

CONFIGS = {"hqq-w4-g64": (4, 64), "hqq-w3-g64": (3, 64)}  # name: (bits, group size)


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, bits: int, group_size: int, integer_zero: bool) -> torch.Tensor:
    """hqq's quantize-then-dequantize of ``weight`` [out, in], float32 throughout; its zero point
    rounded to an integer first when ``integer_zero``."""
    codes, meta = Quantizer.quantize(
        weight, nbits=bits, channel_wise=True, group_size=group_size, optimize=True, round_zero=False, axis=1,
        bitpack=False, compute_dtype=torch.float32, device="cpu",
    )
    if not integer_zero:
        return Quantizer.dequantize(codes, meta).reshape(weight.shape)
    # meta's scale multiplies on dequantize: w ≈ (q − z) · scale, one (scale, zero) per row of groups
    scale, zero = meta["scale"].float().reshape(-1, 1), meta["zero"].float().reshape(-1, 1).round()
    groups = weight.float().reshape(-1, group_size)
    q = (groups / scale + zero).round().clamp(0, 2**bits - 1)
    return ((q - zero) * scale).reshape(weight.shape)


def main() -> None:
    args = parse_args(__doc__, list(CONFIGS), {"--integer-zero": "round hqq's zero points to integers, as squeeze's formats store them"})
    bits, group_size = CONFIGS[args.config]
    loaded = load_model(MODEL)
    model = loaded.model
    reference = copy.deepcopy(model)
    names, parameters, _ = quantized_linears(model)

    start = time.perf_counter()
    for name in names:
        linear = model.get_submodule(name)
        linear.weight.copy_(fake_quantize(linear.weight, bits, group_size, args.integer_zero))
    quantize_s = time.perf_counter() - start

    scores, eval_s = evaluate(model, reference, evaluation_sets(loaded.tokenizer, args))
    zero_words = "zero point rounded to an integer" if args.integer_zero else "real (float) zero point"
    write_result(args.result, {
        "scheme": f"int{bits} asym per-group({group_size}), {zero_words}",
        "format": "none (fake-quantized in memory)",
        "eval": scores,
        # float16 scale and zero point per group; an integer zero point packs into ``bits`` bits
        "bits_per_weight": bits + (16 + (bits if args.integer_zero else 16)) / group_size,
        "quantize_s": quantize_s,
        "eval_s": eval_s,
        "layers": len(names),
        "parameters": parameters,
        "settings": {
            "hqq": importlib.metadata.version("hqq"), "torch": torch.__version__, "nbits": bits, "group_size": group_size,
            "integer_zero": args.integer_zero,
        },
        "how": f"hqq {importlib.metadata.version('hqq')} Quantizer.quantize(optimize=True, axis=1, nbits={bits}, "
        f"group_size={group_size}) on every Linear but lm_head, "
        + ("zero point rounded to an integer and codes re-rounded, " if args.integer_zero else "")
        + "dequantized in place",
    })


if __name__ == "__main__":
    main()
