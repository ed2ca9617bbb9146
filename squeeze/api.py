"""The Python API the CLI calls: each verb validates everything cheap first, then does the work.

Order of every pass: check the output directory, resolve the model (fast validation), check the
text source, load, plan the layers (patterns, group sizes), then the long work (calibrate,
compress, evaluate) and finally write checkpoint and report into a temporary directory that is
renamed into place only when everything succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from squeeze import __version__
from squeeze.data import calibration_windows, evaluation_windows, load_documents
from squeeze.device import COMPUTE_DTYPES, resolve_device, resolve_dtype
from squeeze.errors import OptionError
from squeeze.evaluate import compare_causal, compare_encoder, parameter_count, peak_rss_bytes, tensor_bytes
from squeeze import formats
from squeeze.formats.compressed_tensors import checkpoint_state_dict
from squeeze.models import (
    LoadedModel, ModelSource, atomic_output_dir, check_output_dir, is_sparse_folder, load_model, meta_model, publish_dir, resolve_model,
)
from squeeze.formats import write_pruned_checkpoint
from squeeze.formats.sparse import LOADING_SNIPPET, bitmask_bytes
from squeeze.progress import NullProgress, Progress
from squeeze.prune.apply import PruneConfig, plan_prune, prune_model
from squeeze.prune.methods import PRUNE_METHODS
from squeeze.quant.apply import QuantizeConfig, plan_quantize, quantize_model
from squeeze.quant.methods import METHODS
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4Linear
from squeeze.report import LayerReport, Report, SizeReport, write_report
from squeeze.passes.common import (  # the old private names, as quantize and prune call them
    GENERATION_PROMPT_TOKENS, GENERATION_PROMPTS, GENERATION_TOKENS, SPARSE_INPUT_SHARE, Prepared as _Prepared,
    Stopwatch as _Stopwatch, batches as _batches, check_speed_kind as _check_speed_kind, eval_seq_len as _eval_seq_len,
    evaluate_accuracy as _evaluate, generation_agreement as _generation_agreement, model_info as _model_info,
    prepare as _prepare, reference_name as _reference_name, sparsity_report as _sparsity_report,
    sparsity_structure as _sparsity_structure, speed_comparison as _measure_speed,
)
from squeeze.passes.distill import PERIODIC_EVAL_WINDOWS, distill
from squeeze.passes.evaluate import EvalResult, evaluate_model
from squeeze.passes.generate import generate_side_by_side, read_prompts
# The recipe runner (plan_run, run_recipe, STAGE_FILE) lives in squeeze.chain. api does not
# re-export it yet: chain takes quantize and prune from squeeze.passes, whose bridges import them
# from here, so importing chain here would be a circle until their bodies move to squeeze.passes.



def quantize(
    model: str,
    out: Path,
    config: QuantizeConfig,
    data: str = "wikipedia",
    calibration_data: str | None = None,
    eval_tokens: int = 16384,
    seq_len: int = 512,
    calibration_samples: int = 128,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    reference: str | None = None,
    measure_speed: bool = False,
    generation_prompts: int = GENERATION_PROMPTS,
) -> Report:
    """Quantize ``model`` with ``config``, write a compressed-tensors checkpoint and report to ``out``.

    ``data`` is the text source for evaluation (and for calibration unless ``calibration_data``
    names another); calibration and evaluation use disjoint documents of it. ``eval_tokens`` is
    rounded down to whole windows of ``seq_len`` tokens. Returns the report (also written to
    ``out/report.json`` and ``out/report.md``). ``dtype`` is the compute dtype: the model is
    loaded, calibrated and evaluated in it (the original it is compared with too); unquantized
    tensors are saved in the dtype the source stores. ``trust_remote_code`` lets transformers run
    code shipped with the model; it is never implied. ``reference`` names the model the evaluation
    compares with (default: ``model`` itself), e.g. the original of a chain of passes.
    """
    formats.check_format(config.format, config.scheme, config.method)  # before anything is read
    progress = progress or NullProgress()
    watch = _Stopwatch()
    out = Path(out)
    prep = _prepare(
        model, out, overwrite, device, dtype, trust_remote_code, data, calibration_data, evaluate,
        config.needs_calibration, lambda net: plan_quantize(net, config), eval_tokens, seq_len, calibration_samples,
        watch, progress, reference,
    )
    loaded, net, layers, device = prep.loaded, prep.loaded.model, prep.plan, prep.device
    source, seq_len, eval_windows, calib_windows, reference_model = prep.source, prep.seq_len, prep.eval_windows, prep.calib_windows, prep.reference
    if measure_speed:
        _check_speed_kind(source.kind)
    parameters, memory_before, disk_before, linear_flops = prep.parameters, prep.memory_before, prep.disk_before, prep.linear_flops
    linear_before = sum(m.weight.numel() * loaded.stored_dtype.itemsize for m in layers.values())
    compressed_parameters = sum(m.weight.numel() for m in layers.values())
    input_zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
    sparse_input = _sparsity_structure(layers, input_zeros)
    del prep

    label, total = METHODS.get(config.method).steps(net, layers)
    batches = list(_batches(calib_windows, batch_size, device)) if calib_windows is not None else None
    del layers  # the pass replaces each Linear in place; holding them here would keep every dense weight alive
    with watch.stage("quantize"), progress.task(label, total) as advance:
        result = quantize_model(net, config, batches, on_step=lambda _name: advance(1))
    if batches is not None:
        # a calibrating method interleaves running calibration text and its own work: split the time
        watch.timings["calibrate"] = result.calibration_s
        watch.timings["quantize"] -= result.calibration_s

    accuracy = None
    if eval_windows is not None and reference_model is not None:
        accuracy = _evaluate(
            net, loaded.source.kind, reference_model, eval_windows, data, seq_len, batch_size, watch, progress,
            _reference_name(reference), loaded.tokenizer, generation_prompts,
        )
        del reference_model

    method_settings = config.options.settings()
    sparsity = None
    notes = list(result.notes)
    if sparse_input is not None:
        sparsity = _sparsity_report(
            sparse_input, sum(input_zeros.values()) / max(compressed_parameters, 1),
            [(e.shape[0] * e.shape[1], e.zeros) for e in result.layers], linear_flops,
        )
        lost = sum(e.zeros_lost for e in result.layers)
        kept = sum(input_zeros.values()) - lost
        notes.append(
            f"the model was pruned ({sparse_input}, {sparsity.target:.2%} zeros): {kept:,} of its {sum(input_zeros.values()):,} "
            f"zero weights are still exactly zero after quantization" + (f"; {lost:,} are not" if lost else "")
        )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with watch.stage("save"), progress.status(f"writing {out}"):
            written = formats.write(
                config.format, net, config.scheme, result.ignored, tmp, tokenizer=loaded.tokenizer,
                dtype=loaded.stored_dtype, method={"method": config.method, **method_settings},
                sparsity=(sparse_input, sparsity.sparsity, [e.name for e in result.layers if e.zeros]) if sparsity else None,
            )
        files = written.files
        linear_after = sum(
            formats.weight_bytes(config.format, m) for m in net.modules() if isinstance(m, (QuantizedLinear, NF4Linear))
        )
        size = SizeReport(
            parameters=parameters,
            compressed_parameters=compressed_parameters,
            disk_bytes_before=disk_before,
            disk_bytes_after=sum(f.stat().st_size for f in files),
            memory_bytes_before=memory_before,
            memory_bytes_after=tensor_bytes(net),
            linear_bytes_before=linear_before,
            linear_bytes_after=linear_after,
        )
        report = Report(
            pass_name="quantize",
            model=_model_info(model, source, net),
            settings={
                "method": config.method,
                **method_settings,
                "scheme": "NF4 (bitsandbytes), absmax blocks of 64" if config.format == "bnb-nf4" else config.scheme.describe(),
                "format": formats.describe_format(config.format, config.scheme),
                "targets": list(config.targets) or ["all Linear layers"],
                "ignore": list(config.ignore),
                "full_precision_linear_layers": result.ignored,
                "calibration": (
                    f"{calibration_data or data}: {calib_windows.shape[0]} x {calib_windows.shape[1]} tokens"
                    if calib_windows is not None
                    else "none (round-to-nearest weights need no data)"
                ),
                "calibration_tokens": int(calib_windows.numel()) if calib_windows is not None else 0,
            },
            size=size,
            timings_s=dict(watch.timings),
            peak_rss_bytes=peak_rss_bytes(),
            device=f"{device}, {dtype} compute",
            accuracy=accuracy,
            layers=[
                LayerReport(
                    e.name, e.shape, e.relative_error, e.max_abs_error, e.output_error, e.method_loss,
                    *((e.zeros / (e.shape[0] * e.shape[1]), e.shape[0] * e.shape[1] - e.zeros) if sparsity else (None, None)),
                )
                for e in result.layers
            ],
            notes=notes + written.notes,
            sparsity=sparsity,
            squeeze_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if measure_speed:
            report.speed = _measure_speed(model, tmp, data, device, watch, progress)
        write_report(report, tmp)
    return report


def prune(
    model: str,
    out: Path,
    config: PruneConfig,
    data: str = "wikipedia",
    calibration_data: str | None = None,
    eval_tokens: int = 16384,
    seq_len: int = 512,
    calibration_samples: int = 128,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    reference: str | None = None,
    measure_speed: bool = False,
    generation_prompts: int = GENERATION_PROMPTS,
) -> Report:
    """Prune ``model`` with ``config``; write the checkpoint (sparse-bitmask or dense with zeros) and
    the report to ``out``.

    Text, windows, devices, dtypes and ``reference`` work as in :func:`quantize`. Wanda calibrates on
    ``calibration_samples`` windows of ``calibration_data`` (default: ``data``); magnitude pruning
    reads no text but the evaluation's.
    """
    if config.needs_calibration and calibration_samples < 1:
        raise OptionError(f"{config.method} measures the layers' input activations: it needs calibration text ({{0}} >= 1)", "calib_samples")
    progress = progress or NullProgress()
    watch = _Stopwatch()
    out = Path(out)
    prep = _prepare(
        model, out, overwrite, device, dtype, trust_remote_code, data, calibration_data, evaluate,
        config.needs_calibration, lambda net: plan_prune(net, config), eval_tokens, seq_len, calibration_samples,
        watch, progress, reference,
    )
    loaded, net, plan = prep.loaded, prep.loaded.model, prep.plan
    if measure_speed:
        _check_speed_kind(prep.source.kind)
    stored = loaded.stored_dtype
    targets = {name: sparsity for name, (_, sparsity) in plan.items()}

    label, total = PRUNE_METHODS.get(config.method).steps(net, plan)
    del plan
    batches = list(_batches(prep.calib_windows, batch_size, prep.device)) if prep.calib_windows is not None else None
    with watch.stage("prune"), progress.task(label, total) as advance:
        result = prune_model(net, config, batches, on_step=lambda _name: advance(1))
    if batches is not None:
        watch.timings["calibrate"] = result.calibration_s
        watch.timings["prune"] -= result.calibration_s

    accuracy = None
    if prep.eval_windows is not None and prep.reference is not None:
        accuracy = _evaluate(
            net, loaded.source.kind, prep.reference, prep.eval_windows, data, prep.seq_len, batch_size, watch, progress,
            _reference_name(reference), loaded.tokenizer, generation_prompts,
        )
        prep.reference = None

    sparse_names = [layer.name for layer in result.layers]
    modules = dict(net.named_modules())
    dense_bytes = sum(layer.numel * stored.itemsize for layer in result.layers)
    sparse_bytes = sum(bitmask_bytes(modules[name].weight, stored) for name in sparse_names)
    sparsity = _sparsity_report(
        config.structure,
        sum(targets[layer.name] * layer.numel for layer in result.layers) / max(sum(layer.numel for layer in result.layers), 1),
        [(layer.numel, layer.zeros) for layer in result.layers],
        prep.linear_flops,
        dense_bytes,
        sparse_bytes,
    )
    notes = list(result.notes)
    if result.dense:
        notes.append(f"{len(result.dense)} targeted layer(s) left dense by --layer-sparsity: {', '.join(result.dense)}")
    if config.format == "sparse-bitmask":
        notes.append(
            "sparse-bitmask checkpoint: transformers 5 cannot decompress it by itself (compressed-tensors dropped sparse "
            "decompression in 0.15); squeeze loads it, and so does the loader in report.md; --format dense writes one "
            "that from_pretrained loads as is"
        )
    settings = {
        "scheme": f"{config.method} {config.pattern or f'{config.sparsity:.0%} unstructured'}"
        + (" (global ranking)" if config.scope == "global" else ""),
        "method": config.method,
        "sparsity": config.sparsity,
        "pattern": config.pattern or "unstructured",
        "scope": config.scope if config.n_m is None else "per group of M inputs",
        "layer_sparsity": [f"{p}={v:g}" for p, v in config.layer_sparsity],
        **config.options.settings(),
        "sparsity_ramp": config.sparsity_ramp,
        "format": f"{config.format} (compressed-tensors sparsity_config)",
        "targets": list(config.targets) or ["all Linear layers"],
        "ignore": list(config.ignore),
        "calibration": (
            f"{calibration_data or data}: {prep.calib_windows.shape[0]} x {prep.calib_windows.shape[1]} tokens"
            if prep.calib_windows is not None
            else "none (magnitude pruning needs no data)"
        ),
        "calibration_tokens": int(prep.calib_windows.numel()) if prep.calib_windows is not None else 0,
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with watch.stage("save"), progress.status(f"writing {out}"):
            files = write_pruned_checkpoint(
                net, config.format, config.structure, sparsity.sparsity, sparse_names, tmp, loaded.tokenizer, stored
            )
        size = SizeReport(
            parameters=prep.parameters,
            compressed_parameters=sparsity.parameters,
            disk_bytes_before=prep.disk_before,
            disk_bytes_after=sum(f.stat().st_size for f in files),
            memory_bytes_before=prep.memory_before,
            memory_bytes_after=tensor_bytes(net),
            linear_bytes_before=dense_bytes,
            linear_bytes_after=sparse_bytes if config.format == "sparse-bitmask" else dense_bytes,
        )
        auto_class = "AutoModelForCausalLM" if prep.source.kind == "causal" else "AutoModel"
        report = Report(
            pass_name="prune",
            model=_model_info(model, prep.source, net),
            settings=settings,
            size=size,
            timings_s=dict(watch.timings),
            peak_rss_bytes=peak_rss_bytes(),
            device=f"{prep.device}, {dtype} compute",
            accuracy=accuracy,
            layers=[
                LayerReport(
                    layer.name, layer.shape, layer.relative_error, layer.max_abs_error, layer.output_error, None,
                    layer.sparsity, layer.numel - layer.zeros,
                )
                for layer in result.layers
            ],
            notes=notes,
            sparsity=sparsity,
            loading=(
                "```python\n" + LOADING_SNIPPET.format(folder=out, auto_class=auto_class) + "```\n"
                if config.format == "sparse-bitmask"
                else f"`transformers.{auto_class}.from_pretrained(\"{out}\")`: the zeros are stored dense.\n"
            ),
            squeeze_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if measure_speed:
            report.speed = _measure_speed(model, tmp, data, device, watch, progress)
        write_report(report, tmp)
    return report
