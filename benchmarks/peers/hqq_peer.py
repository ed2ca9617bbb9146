"""The hqq package's row of benchmarks/quantize_hqq.py: fake-quantize SmolLM2 with hqq's own quantizer.

    benchmarks/peers/.venv-hqq/bin/python benchmarks/peers/hqq_peer.py hqq-w4-g64 --calib-samples 32 --eval-tokens 4096 --out DIR --result ROW.json

Runs in benchmarks/peers/.venv-hqq (``setup_hqq.sh``). Every targeted Linear weight of the same fp32
model squeeze quantizes (all but lm_head) goes through ``hqq.core.quantize.Quantizer.quantize``
with hqq's defaults for weights (``optimize=True``: the proximal solver of the HQQ paper, lp norm
0.7, beta 10, kappa 1.01, at most 20 steps, early stopping; ``axis=1``: groups along the input
dimension, as squeeze's) at the same bits and group size, and is replaced by its dequantized
value. Only that loop is timed. The model is scored with squeeze's ``compare_causal`` against an
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
def fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """hqq's quantize-then-dequantize of ``weight`` [out, in], float32 throughout."""
    codes, meta = Quantizer.quantize(
        weight, nbits=bits, channel_wise=True, group_size=group_size, optimize=True, round_zero=False, axis=1,
        bitpack=False, compute_dtype=torch.float32, device="cpu",
    )
    return Quantizer.dequantize(codes, meta).reshape(weight.shape)


def main() -> None:
    args = parse_args(__doc__, list(CONFIGS))
    bits, group_size = CONFIGS[args.config]
    loaded = load_model(MODEL)
    model = loaded.model
    reference = copy.deepcopy(model)
    names, parameters, _ = quantized_linears(model)

    start = time.perf_counter()
    for name in names:
        linear = model.get_submodule(name)
        linear.weight.copy_(fake_quantize(linear.weight, bits, group_size))
    quantize_s = time.perf_counter() - start

    scores, eval_s = evaluate(model, reference, evaluation_sets(loaded.tokenizer, args))
    write_result(args.result, {
        "scheme": f"int{bits} asym per-group({group_size}), real (float) zero point",
        "format": "none (fake-quantized in memory)",
        "eval": scores,
        # hqq's own storage: the codes plus a float16 scale and a float16 zero point per group
        "bits_per_weight": bits + 32 / group_size,
        "quantize_s": quantize_s,
        "eval_s": eval_s,
        "layers": len(names),
        "parameters": parameters,
        "settings": {"hqq": importlib.metadata.version("hqq"), "torch": torch.__version__, "nbits": bits, "group_size": group_size},
        "how": f"hqq {importlib.metadata.version('hqq')} Quantizer.quantize(optimize=True, axis=1, nbits={bits}, "
        f"group_size={group_size}) on every Linear but lm_head, dequantized in place",
    })


if __name__ == "__main__":
    main()
