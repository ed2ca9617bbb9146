"""Intel auto-round's rows of benchmarks/quantize_calibrated.py: learned rounding (SignRound) of SmolLM2.

    benchmarks/peers/.venv-autoround/bin/python benchmarks/peers/autoround_peer.py autoround-w4-g64 --calib-samples 32 --eval-tokens 4096 --out DIR --result ROW.json

Runs in benchmarks/peers/.venv-autoround (``setup_autoround.sh``). The same fp32 model squeeze
quantizes goes through ``auto_round.AutoRound`` with squeeze's calibration token rows (one window
per dataset entry, ``nsamples`` = the number of rows, ``seqlen`` = their length), the number of
steps squeeze's ``--method autoround`` takes by default (auto-round's own default, 200, took
minutes per block on 2 CPU cores), the same rows per step as squeeze's (the benchmark's batch of 2
windows; auto-round's default batch of 8 costs four times the compute per step and would take hours
on 2 cores), and auto-round's defaults otherwise (learned clip ranges, its learning rates), at
the row's bits and group size, symmetric, every Linear but lm_head. auto-round writes its ``fake``
format (weights quantized then dequantized, as the model it returns holds them); that model is
scored with squeeze's ``compare_causal`` against an fp32 copy on the same evaluation windows as
squeeze's rows. The bits per weight are the scheme's (codes plus a float16 scale per group), since
the fake checkpoint stores real-valued weights.
"""

from __future__ import annotations

import copy
import importlib.metadata
import time

import torch
from auto_round import AutoRound

from peer_common import MODEL, calibration_rows, evaluate, evaluation_sets, parse_args, quantized_linears, write_result
from squeeze.models import load_model
from squeeze.quant.methods.autoround import AutoRoundOptions

ITERS = AutoRoundOptions.model_fields["autoround_iters"].default  # the same budget of steps as squeeze's
BATCH = 2  # windows per step: squeeze's one batch of the benchmark's --batch-size 2

CONFIGS = {"autoround-w4-g64": (4, 64), "autoround-w3-g64": (3, 64)}  # name: (bits, group size)


def main() -> None:
    args = parse_args(__doc__, list(CONFIGS))
    bits, group_size = CONFIGS[args.config]
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    model = loaded.model
    reference = copy.deepcopy(model)
    names, parameters, _ = quantized_linears(model)
    rows = calibration_rows(loaded.tokenizer, args)
    dataset = [rows[i : i + 1] for i in range(rows.shape[0])]

    start = time.perf_counter()
    rounder = AutoRound(
        model, loaded.tokenizer, scheme="W4A16", bits=bits, group_size=group_size, sym=True, dataset=dataset,
        nsamples=rows.shape[0], seqlen=rows.shape[1], iters=ITERS, batch_size=BATCH, device_map="cpu", enable_torch_compile=False,
        layer_config={"lm_head": {"bits": 16}},
    )
    quantized, _ = rounder.quantize_and_save(str(args.out), format="fake")
    quantize_s = time.perf_counter() - start
    quantized = quantized.float().eval()

    scores, eval_s = evaluate(quantized, reference, evaluation_sets(loaded.tokenizer, args))
    write_result(args.result, {
        "scheme": f"int{bits} sym per-group({group_size})",
        "format": "auto-round fake (dequantized weights)",
        "eval": scores,
        "bits_per_weight": bits + 16 / group_size,  # float16 scale per group
        "calibration_tokens": int(rows.numel()),
        "quantize_s": quantize_s,
        "eval_s": eval_s,
        "layers": len(names),
        "parameters": parameters,
        "settings": {
            "auto-round": importlib.metadata.version("auto-round"), "torch": torch.__version__, "bits": bits,
            "group_size": group_size, "sym": True, "nsamples": rows.shape[0], "seqlen": rows.shape[1],
            **{name: str(getattr(rounder, name, "its default")) for name in ("iters", "batch_size", "lr", "minmax_lr")},
        },
        "how": f"auto-round {importlib.metadata.version('auto-round')} AutoRound(bits={bits}, group_size={group_size}, sym=True, "
        f"iters={ITERS}, batch_size={BATCH}, squeeze's {rows.shape[0]} x {rows.shape[1]} calibration rows, defaults otherwise) on every Linear but lm_head, "
        "fake format, scored in memory",
    })


if __name__ == "__main__":
    main()
