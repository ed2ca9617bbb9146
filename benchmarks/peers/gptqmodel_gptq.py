"""GPTQModel's GPTQ on SmolLM2, one configuration per process.

    benchmarks/peers/.venv-gptqmodel/bin/python benchmarks/peers/gptqmodel_gptq.py CONFIG \
        --calib-samples N --seq-len 512 --eval-tokens T --out DIR --result JSON

Runs in its own venv (benchmarks/peers/setup_gptqmodel.sh: GPTQModel pins a newer transformers and
numpy than llm-compressor). GPTQModel loads the fp32 HF folder squeeze caches for its built-in model,
in fp32 (its CPU default would be bf16), and quantizes it (timed) with squeeze's own calibration
token rows. Its in-memory model cannot run afterwards (finished layers are offloaded to disk), so
the GPTQ checkpoint it saves is loaded back with GPTQModel.load (timed apart).

It is scored with squeeze's ``compare_causal`` on squeeze's evaluation windows of two texts, as the
fp32 model loaded by squeeze with each quantized Linear's weight replaced by GPTQModel's own
dequantization of it, against that fp32 model. That is how the other rows are scored
(llm-compressor's fake-quant, squeeze's own), so rows differ only in their weights. GPTQModel's own
CPU kernel is not used: it computes in bf16 (it casts fp32 inputs down), and it refuses
per-channel weights on this model (aten's int4 CPU matmul takes groups of 32-256, not 576).

Writes one JSON object to ``--result``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time

import torch

from peer_common import MODEL, calibration_rows, evaluate, evaluation_sets, parse_args, quantized_linears, size_fields, write_result
from squeeze.models import load_model

CONFIGS = ["gptq-w4-per-channel", "gptq-w4-g64", "gptq-w3-g64"]
CPU_WORKERS = "2"  # GPTQModel's own thread pool; its default takes half the cores per worker


def dequantized_copy(reference: torch.nn.Module, quantized: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """``reference`` with each named Linear's weight set to GPTQModel's fp32 dequantization of it.

    Must run before the quantized model's first forward, which repacks its tensors for the CPU kernel.
    """
    model = copy.deepcopy(reference)
    with torch.no_grad():
        for name in names:
            weight = quantized.get_submodule(name).dequantize_weight()  # [in, out]
            model.get_submodule(name).weight.copy_(weight.T.float())
    return model


def layout(config: str) -> dict:
    """QuantizeConfig arguments for per-channel or group-64 weights; GPTQModel's defaults otherwise.

    GPTQ format writes per-channel as group_size -1. GPTQModel's default column order for GPTQ is
    act_group_aware (it orders whole groups by activation), which refuses group_size -1; per-channel
    takes desc_act (columns in order of activation) instead, so both layouts are activation-ordered,
    as llm-compressor's default actorder "static" is.
    """
    if config.endswith("per-channel"):
        return {"group_size": -1, "desc_act": True, "act_group_aware": False}
    return {"group_size": 64}


def main() -> None:
    args = parse_args(__doc__, CONFIGS)
    # read when gptqmodel is imported
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", CPU_WORKERS)

    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    import squeeze

    print(f"squeeze imported from {squeeze.__file__}", flush=True)

    loaded = load_model(MODEL)  # the fp32 reference, and the tokenizer squeeze's windows come from
    reference, tokenizer = loaded.model, loaded.tokenizer
    names, parameters, linear_before = quantized_linears(reference)
    sets = evaluation_sets(tokenizer, args)
    rows = calibration_rows(tokenizer, args)
    calibration = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in rows]

    config = QuantizeConfig(bits=3 if "-w3-" in args.config else 4, sym=True, **layout(args.config))
    start = time.perf_counter()
    model = GPTQModel.load(str(loaded.source.path), config, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - start

    # GPTQModel writes per-module logs under ./logs: keep them out of the caller's tree.
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        start = time.perf_counter()
        model.quantize(calibration, batch_size=1)
        quantize_s = time.perf_counter() - start

    start = time.perf_counter()
    model.save(str(args.out))
    save_s = time.perf_counter() - start
    del model
    saved = json.loads((args.out / "config.json").read_text()).get("quantization_config", {})

    start = time.perf_counter()
    reload_dtype = torch.float32
    try:
        quantized = GPTQModel.load(str(args.out), device="cpu", dtype=reload_dtype)
    except NotImplementedError:  # its CPU kernel for 3-bit codes takes float16/bfloat16 only
        reload_dtype = torch.float16
        quantized = GPTQModel.load(str(args.out), device="cpu", dtype=reload_dtype)
    reload_s = time.perf_counter() - start
    fake_quant = dequantized_copy(reference, quantized.model, names)
    del quantized
    scores, evaluate_s = evaluate(fake_quant, reference, sets)

    ordering = " (set: its default act_group_aware refuses per-channel)" if config.group_size == -1 else " (its defaults)"
    arguments = {
        "bits": config.bits,
        "group_size": config.group_size,
        "sym": config.sym,
        "desc_act": config.desc_act,
        "act_group_aware": config.act_group_aware,
        "damp_percent": config.damp_percent,
        "damp_auto_increment": config.damp_auto_increment,
        "static_groups": config.static_groups,
        "true_sequential": config.true_sequential,
        "mse": config.mse,
        "offload_to_disk": config.offload_to_disk,
        "dtype": "float32",
        "reload_dtype": str(reload_dtype).removeprefix("torch."),
        "cpu_workers": os.environ["GPTQMODEL_CPU_WORKERS"],
    }
    write_result(
        args.result,
        {
            "scheme": json.dumps({k: arguments[k] for k in ("bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent")}),
            "format": f"{saved.get('quant_method')}/{saved.get('checkpoint_format', saved.get('format'))}",
            "eval": scores,
            **size_fields(args.out, names, parameters, linear_before),
            "calibration_tokens": int(rows.numel()),
            "quantize_s": quantize_s,
            "timings_s": {
                "load": load_s,
                "quantize": quantize_s,
                "save": save_s,
                "reload": reload_s,
                "evaluate": evaluate_s,
            },
            "arguments": arguments,
            "quantization_config": saved,
            "gptqmodel_version": gptqmodel.__version__,
            "how": (
                f"GPTQModel {gptqmodel.__version__}: GPTQModel.load(fp32 folder, dtype float32), then "
                f"quantize(calibration, batch_size 1) with QuantizeConfig(bits {config.bits}, group_size {config.group_size}, sym True, "
                f"desc_act {config.desc_act}, act_group_aware {config.act_group_aware}{ordering}, defaults otherwise: "
                f"damp_percent {config.damp_percent}, damp_auto_increment {config.damp_auto_increment}, "
                f"offload_to_disk {config.offload_to_disk}) on {rows.numel()} calibration tokens (squeeze's rows), lm_head "
                "kept; disk offload leaves the in-memory model on the meta device, so it was saved in GPTQ format and "
                f"reloaded with GPTQModel.load on CPU in {arguments['reload_dtype']} (reload timed apart; float16 where its "
                "CPU kernel has no float32, as for 3-bit codes); scored by squeeze's compare_causal as the fp32 model carrying "
                "GPTQModel's own dequantization of each quantized weight (computed in the reload dtype, upcast to fp32), "
                "against the fp32 model; quantize_s is the quantize call."
            ),
        },
    )


if __name__ == "__main__":
    main()
