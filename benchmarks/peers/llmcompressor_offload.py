"""llm-compressor at its smallest memory on CPU: GPTQ W4 group-64 with the model offloaded to disk.

    benchmarks/peers/.venv/bin/python benchmarks/peers/llmcompressor_offload.py gptq-w4-g64 \
        --calib-samples N --seq-len 512 --eval-tokens T --out DIR --result JSON

Runs in the peers venv (benchmarks/peers/setup.sh). The fp32 SmolLM2 folder squeeze caches is
loaded inside compressed-tensors' ``load_offloaded_model`` with ``device_map="auto_offload"`` and a
CPU allowance of ``CPU_MEMORY_MIB`` (64 MiB: almost every weight goes to the offload folder), so that llm-compressor's sequential pipeline onloads one decoder layer at a time from disk,
which is what its documentation gives for models larger than memory. Then ``oneshot`` with the same
GPTQModifier, calibration rows and scheme as ``llmcompressor_calibrated.py``, and
``save_pretrained(save_compressed=True)``.

Nothing is evaluated here (an in-memory evaluation would need the whole model and an fp32 copy,
which is what disk offload avoids): the peak RSS is the compression's own (load, oneshot, save),
a lower bound on what a run that also scores the result needs. Quality of the same recipe without
offload is in quantize_calibrated's table. ``--eval-tokens`` is accepted for the common CLI and unused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmcompressor_calibrated import calibration_dataset, recipe
from peer_common import MODEL, calibration_rows, parse_args, write_result
from squeeze.models import resolve_model

CONFIGS = ["gptq-w4-g64"]
CPU_MEMORY_MIB = 64  # what accelerate may place in RAM; the rest goes to the offload folder


def main() -> None:
    args = parse_args(__doc__, CONFIGS)

    import llmcompressor
    from compressed_tensors.offload import get_device_map, load_offloaded_model
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(MODEL).path  # the fp32 safetensors folder squeeze converted once
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = calibration_rows(tokenizer, args)
    with tempfile.TemporaryDirectory(prefix="llmc-offload-") as offload:
        start = time.perf_counter()
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, device_map="auto_offload", max_memory={"cpu": CPU_MEMORY_MIB * 2**20},
                offload_folder=offload,
            )
        load_s = time.perf_counter() - start
        placed = [str(offloaded) for _onloaded, offloaded in get_device_map(model).values()]
        devices = {d: placed.count(d) for d in sorted(set(placed))}
        print(f"offloaded to {devices}", flush=True)

        modifiers, arguments, _ = recipe(args.config, type(model).__name__)
        start = time.perf_counter()
        model = oneshot(
            model=model, tokenizer=tokenizer, recipe=modifiers, dataset=calibration_dataset(rows),
            num_calibration_samples=rows.shape[0], max_seq_length=args.seq_len, shuffle_calibration_samples=False,
        )
        quantize_s = time.perf_counter() - start

        start = time.perf_counter()
        model.save_pretrained(args.out, save_compressed=True)
        save_s = time.perf_counter() - start
        offload_bytes = sum(p.stat().st_size for p in Path(offload).rglob("*") if p.is_file())
    saved = json.loads((args.out / "config.json").read_text()).get("quantization_config", {})
    shutil.rmtree(args.out, ignore_errors=True)  # only the measurements are kept

    write_result(
        args.result,
        {
            "format": saved.get("format"),
            "calibration_tokens": int(rows.numel()),
            "quantize_s": quantize_s,
            "timings_s": {"load": load_s, "oneshot": quantize_s, "save": save_s},
            "arguments": {**arguments, "cpu_memory_mib": CPU_MEMORY_MIB},
            "placement": devices,
            "offload_folder_bytes": offload_bytes,
            "llmcompressor_version": llmcompressor.__version__,
            "how": (
                f"llm-compressor {llmcompressor.__version__}: from_pretrained(fp32 folder, device_map auto_offload, "
                f"max_memory cpu {CPU_MEMORY_MIB} MiB) inside load_offloaded_model (weights placed: {devices}), then "
                f"oneshot(GPTQModifier, int4 symmetric group-64 weights, block_size {arguments['block_size']}, "
                f"dampening_frac {arguments['dampening_frac']}, actorder {arguments['actorder']}) on {int(rows.numel())} "
                "calibration tokens (squeeze's rows, unshuffled), save_compressed; no evaluation in this process"
            ),
        },
    )


if __name__ == "__main__":
    main()
