"""The Python API the CLI calls: each verb validates everything cheap first, then does the work.

Order of every pass: check the output directory, resolve the model (fast validation), check the
text source, load, plan the layers (patterns, group sizes), then the long work (calibrate,
compress, evaluate) and finally write checkpoint and report into a temporary directory that is
renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from squeeze import __version__
from squeeze.data import calibration_windows, evaluation_windows, load_documents
from squeeze.distill.config import DistillConfig
from squeeze.device import COMPUTE_DTYPES, resolve_device, resolve_dtype
from squeeze.errors import SqueezeError
from squeeze.evaluate import compare_causal, compare_encoder, parameter_count, peak_rss_bytes, tensor_bytes
from squeeze import formats
from squeeze.formats.compressed_tensors import checkpoint_state_dict
from squeeze.models import (
    LoadedModel, ModelSource, atomic_output_dir, check_output_dir, is_sparse_folder, load_model, meta_model, publish_dir, resolve_model,
)
from squeeze.formats.sparse import LOADING_SNIPPET, bitmask_bytes, write_pruned_checkpoint
from squeeze.progress import NullProgress, Progress
from squeeze.prune.apply import PruneConfig, plan_prune, prune_model
from squeeze.quant.apply import (
    QuantizeConfig,
    observe_input_ranges,
    plan_layers,
    quantize_model,
    quantize_model_gptq,
    quantize_model_smoothquant,
)
from squeeze.quant.awq import quantize_model_awq
from squeeze.quant.linear import QuantizedLinear
from squeeze.quant.nf4 import NF4Linear
from squeeze.quant.sequential import block_list
from squeeze.report import AccuracyReport, LayerReport, Report, SizeReport, SparsityReport, write_report


def _awq(net, config: QuantizeConfig, batches, on_block=None):
    return quantize_model_awq(net, config, batches, on_block, n_grid=config.awq_grid, clip=config.awq_clip)


# methods that calibrate one transformer block at a time
BLOCKWISE_METHODS = {"gptq": quantize_model_gptq, "smoothquant": quantize_model_smoothquant, "awq": _awq}


GENERATION_PROMPTS = 8  # prompts for a pass report's generation agreement (0: none)
GENERATION_PROMPT_TOKENS = 64
GENERATION_TOKENS = 32  # greedy new tokens per prompt


class _Stopwatch:
    """Wall time per named stage, in seconds."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _eval_seq_len(loaded: LoadedModel, seq_len: int) -> int:
    limit = getattr(loaded.config, "max_position_embeddings", None)
    return min(seq_len, limit) if limit else seq_len


def _batches(windows: torch.Tensor, batch_size: int, device: str) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, windows.shape[0], batch_size):
        yield {"input_ids": windows[start : start + batch_size].to(device)}


@dataclass
class _Prepared:
    """What every pass has once its cheap checks passed and the model is loaded."""

    source: ModelSource
    loaded: LoadedModel
    device: str
    plan: dict
    seq_len: int
    eval_windows: torch.Tensor | None
    calib_windows: torch.Tensor | None
    reference: torch.nn.Module | None
    parameters: int
    memory_before: int
    disk_before: int
    linear_flops: int  # 2 · Σ out · in over every Linear layer: matmul FLOPs per token


def _prepare(
    model: str,
    out: Path,
    overwrite: bool,
    device: str,
    dtype: str,
    trust_remote_code: bool,
    data: str,
    calibration_data: str | None,
    evaluate: bool,
    needs_calibration: bool,
    plan: Callable[[torch.nn.Module], dict],
    eval_tokens: int,
    seq_len: int,
    calibration_samples: int,
    watch: _Stopwatch,
    progress: Progress,
    reference: str | None = None,
) -> _Prepared:
    """Validate everything cheap (output directory, device, dtype, model, ``plan`` on the meta
    model, text sources), then load the model and cut the evaluation and calibration windows.
    The evaluation compares with a copy of the input, or with ``reference`` when one is named."""
    from squeeze.distill.student import check_vocab_sizes

    check_output_dir(out, overwrite)
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    meta = meta_model(source)
    plan(meta)
    ref_source = None
    if reference is not None and evaluate:
        ref_source = resolve_model(reference, trust_remote_code=trust_remote_code)
        check_vocab_sizes(meta_model(ref_source).config, meta.config)
    if evaluate:
        load_documents(data)
    if needs_calibration:
        load_documents(calibration_data or data)

    with watch.stage("load"), progress.status(f"loading {source.name}"):
        loaded = load_model(source, device=device, dtype=compute_dtype)
    net = loaded.model
    layers = plan(net)
    seq_len = _eval_seq_len(loaded, seq_len)
    eval_windows = evaluation_windows(loaded.tokenizer, data, seq_len, eval_tokens) if evaluate else None
    calib_windows = None
    if needs_calibration:
        calib_windows = calibration_windows(loaded.tokenizer, calibration_data or data, calibration_samples, seq_len)
    reference_model = None
    if ref_source is not None:
        with watch.stage("load"), progress.status(f"loading the reference {ref_source.name}"):
            reference_model = load_model(ref_source, device=device, dtype=compute_dtype).model
    elif evaluate:
        reference_model = copy.deepcopy(net)
    return _Prepared(
        source=source,
        loaded=loaded,
        device=device,
        plan=layers,
        seq_len=seq_len,
        eval_windows=eval_windows,
        calib_windows=calib_windows,
        reference=reference_model,
        parameters=parameter_count(net),
        memory_before=tensor_bytes(net),
        disk_before=sum(t.numel() * t.element_size() for t in checkpoint_state_dict(net, loaded.stored_dtype).values()),
        linear_flops=sum(2 * m.in_features * m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)),
    )


SPARSE_INPUT_SHARE = 0.01  # a model with at least this share of exact zeros in its layers counts as pruned


def _sparsity_structure(layers: dict[str, torch.nn.Module], zeros: dict[str, int]) -> str | None:
    """``N:M`` if every layer holding zeros follows one of the common patterns, ``unstructured``
    if the layers hold at least SPARSE_INPUT_SHARE exact zeros otherwise, None for a dense model."""
    from squeeze.prune.masks import is_n_m

    total = sum(m.weight.numel() for m in layers.values())
    if sum(zeros.values()) < SPARSE_INPUT_SHARE * total:
        return None
    sparse = [m.weight for name, m in layers.items() if zeros[name]]
    for n, m in ((1, 4), (2, 4), (4, 8)):  # tightest first: a 1:4 layer also has at most 2 of 4
        if all(is_n_m(w, n, m) for w in sparse):
            return f"{n}:{m}"
    return "unstructured"


def _sparsity_report(
    structure: str, target: float, layers: list[tuple[int, int]], linear_flops: int, dense_bytes: int | None = None, sparse_bytes: int | None = None,
) -> SparsityReport:
    """From (parameters, zeros) per sparse layer: totals, and FLOPs with those zeros skipped."""
    parameters = sum(p for p, _ in layers)
    zeros = sum(z for _, z in layers)
    return SparsityReport(
        structure=structure,
        target=target,
        parameters=parameters,
        zeros=zeros,
        dense_bytes=dense_bytes,
        sparse_bytes=sparse_bytes,
        linear_flops_dense=linear_flops,
        linear_flops_sparse=linear_flops - 2 * zeros,
    )


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
    progress = progress or NullProgress()
    watch = _Stopwatch()
    out = Path(out)
    prep = _prepare(
        model, out, overwrite, device, dtype, trust_remote_code, data, calibration_data, evaluate,
        config.needs_calibration, lambda net: plan_layers(net, config), eval_tokens, seq_len, calibration_samples,
        watch, progress, reference,
    )
    loaded, net, layers, device = prep.loaded, prep.loaded.model, prep.plan, prep.device
    source, seq_len, eval_windows, calib_windows, reference_model = prep.source, prep.seq_len, prep.eval_windows, prep.calib_windows, prep.reference
    if measure_speed:
        _check_speed_kind(source.kind)
    parameters, memory_before, disk_before, linear_flops = prep.parameters, prep.memory_before, prep.disk_before, prep.linear_flops
    linear_before = sum(m.weight.numel() * loaded.stored_dtype.itemsize for m in layers.values())
    compressed_parameters = sum(m.weight.numel() for m in layers.values())
    layer_count = len(layers)
    input_zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
    sparse_input = _sparsity_structure(layers, input_zeros)
    del prep

    ranges = None
    if calib_windows is not None and config.method == "rtn":
        with watch.stage("calibrate"), progress.task("calibrating activation ranges", calib_windows.shape[0]) as advance:
            ranges = observe_input_ranges(
                net, layers, _batches(calib_windows, batch_size, device), on_batch=lambda: advance(batch_size)
            )
    if config.method in BLOCKWISE_METHODS:
        assert calib_windows is not None
        del layers  # as below: let each dense weight go once its layer is quantized
        batches = list(_batches(calib_windows, batch_size, device))
        blockwise = BLOCKWISE_METHODS[config.method]
        with watch.stage("quantize"), progress.task(f"{config.method}, block by block", len(block_list(net)[1])) as advance:
            result = blockwise(net, config, batches, on_block=lambda _name: advance(1))
        # the block-by-block methods interleave running calibration text and solving: split the time
        watch.timings["calibrate"] = result.calibration_s
        watch.timings["quantize"] -= result.calibration_s
    else:
        # the pass replaces each Linear in place; holding them here would keep every dense weight alive
        del layers
        with watch.stage("quantize"), progress.task("quantizing layers", layer_count) as advance:
            result = quantize_model(net, config, ranges, on_layer=lambda _name: advance(1))

    accuracy = None
    if eval_windows is not None and reference_model is not None:
        accuracy = _evaluate(
            net, loaded.source.kind, reference_model, eval_windows, data, seq_len, batch_size, watch, progress,
            _reference_name(reference), loaded.tokenizer, generation_prompts,
        )
        del reference_model

    method_settings = _method_settings(config)
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


def _check_speed_kind(kind: str) -> None:
    if kind != "causal":
        raise SqueezeError("--measure-speed measures prefill and decode of causal LMs; this is an encoder")


def _measure_speed(model: str, written: Path, data: str, device: str, watch: _Stopwatch, progress: Progress) -> dict:
    """--measure-speed: prefill/decode tokens/s and memory of the input (fp32) and the checkpoint just
    written (quantized layers on integer kernels), each in its own process, as ``squeeze bench-infer``."""
    from squeeze.speed import Form, bench_infer

    forms = [Form("input", model), Form("output", str(written))]
    # bench-infer's 512 + 128 tokens, or what fits a model with fewer positions
    positions = getattr(meta_model(resolve_model(model)).config, "max_position_embeddings", None) or 640
    prefill, decode = min(512, positions // 2), min(128, positions // 4)
    with watch.stage("measure speed"), progress.status("measuring prefill and decode speed"):
        return bench_infer(
            model, forms, data=data, prefill_tokens=prefill, decode_tokens=decode, repeats=2, agreement_prompts=0, device=device,
        ).to_dict()


def _model_info(spec: str, source: ModelSource, net: torch.nn.Module) -> dict:
    return {"spec": spec, "name": source.name, "kind": source.kind, "architecture": type(net).__name__}


def _method_settings(config: QuantizeConfig) -> dict:
    """The method's own parameters, for the report and the checkpoint's metadata."""
    if config.method == "gptq":
        return {
            "damp_percent": config.damp_percent,
            "block_size": config.block_size,
            "act_order": config.act_order,
            "true_sequential": config.true_sequential,
        }
    if config.method == "smoothquant":
        return {"alpha": config.alpha}
    if config.method == "awq":
        return {"awq_grid": config.awq_grid, "awq_clip": config.awq_clip}
    return {}


def _generation_agreement(model, reference, tokenizer, data: str, prompts: int, watch: _Stopwatch, progress: Progress) -> dict:
    """ROUGE/BLEU of ``model``'s greedy continuations against ``reference``'s, as AccuracyReport fields."""
    from squeeze.generate import greedy_agreement, prompts_from_text

    with watch.stage("generate"), progress.status(f"greedy continuations of {prompts} prompts, both models"):
        windows = prompts_from_text(tokenizer, data, prompts, GENERATION_PROMPT_TOKENS)
        scores, _ = greedy_agreement(model, reference, tokenizer, windows, GENERATION_TOKENS)
    return {
        "generation_prompts": scores.prompts, "generation_tokens": GENERATION_TOKENS, "rouge1": scores.rouge1,
        "rouge2": scores.rouge2, "rougeL": scores.rougeL, "bleu": scores.bleu, "exact_match": scores.exact_match,
    }


def _reference_name(reference: str | None) -> str | None:
    return f"original ({Path(reference).name or reference})" if reference else None


def _evaluate(
    model: torch.nn.Module,
    kind: str,
    reference: torch.nn.Module,
    windows: torch.Tensor,
    data: str,
    seq_len: int,
    batch_size: int,
    watch: _Stopwatch,
    progress: Progress,
    compared_with: str | None = None,
    tokenizer=None,
    generation_prompts: int = 0,
) -> AccuracyReport:
    """Score ``model`` against ``reference`` on ``windows``; for causal LMs with ``generation_prompts``
    also the agreement of their greedy continuations (GENERATION_TOKENS each) on prompts from ``data``."""
    if kind == "causal":
        with watch.stage("evaluate"), progress.task(f"evaluating on {data}", windows.shape[0]) as advance:
            cmp = compare_causal(model, windows, reference, batch_size=batch_size, on_batch=advance)
        generation = {}
        if generation_prompts and tokenizer is not None:
            generation = _generation_agreement(model, reference, tokenizer, data, generation_prompts, watch, progress)
        return AccuracyReport(
            **generation,
            data=data,
            windows=windows.shape[0],
            seq_len=seq_len,
            tokens=cmp.tokens,
            perplexity_before=cmp.reference_perplexity,
            perplexity_after=cmp.perplexity,
            kl_divergence=cmp.kl_divergence,
            top1_agreement=cmp.top1_agreement,
            reference=compared_with,
        )
    with watch.stage("evaluate"), progress.task(f"evaluating on {data}", windows.shape[0]) as advance:
        enc = compare_encoder(model, reference, windows, batch_size=max(batch_size, 8), on_batch=advance)
    return AccuracyReport(
        data=data,
        windows=enc.windows,
        seq_len=seq_len,
        tokens=enc.tokens,
        embedding_cosine_mean=enc.cosine_mean,
        embedding_cosine_min=enc.cosine_min,
        reference=compared_with,
    )


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
        raise SqueezeError(f"{config.method} measures the layers' input activations: it needs calibration text (--calib-samples >= 1)")
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
    del plan

    if config.needs_calibration:
        assert prep.calib_windows is not None
        batches = list(_batches(prep.calib_windows, batch_size, prep.device))
        with watch.stage("prune"), progress.task(f"{config.method}, block by block", len(block_list(net)[1])) as advance:
            result = prune_model(net, config, batches, on_step=lambda _name: advance(1))
        watch.timings["calibrate"] = result.calibration_s
        watch.timings["prune"] -= result.calibration_s
    else:
        with watch.stage("prune"), progress.task("pruning layers", len(targets)) as advance:
            result = prune_model(net, config, on_step=lambda _name: advance(1))

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
        **({"block_size": config.block_size, "damp_percent": config.damp_percent} if config.method == "sparsegpt" else {}),
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


def distill(
    teacher: str,
    student: str,
    out: Path,
    config: DistillConfig,
    data: str = "wikipedia",
    eval_data: str | None = None,
    eval_tokens: int = 16384,
    seq_len: int = 512,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    checkpoint_dir: Path | None = None,
    teacher_cache: Path | None = None,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    measure_speed: bool = False,
    generation_prompts: int = GENERATION_PROMPTS,
) -> Report | None:
    """Train ``student`` to imitate ``teacher``; write it (safetensors) and the report to ``out``.

    ``student`` is ``layers:K`` / ``layers:I,J,...`` (teacher blocks kept, with their weights),
    ``width:F`` (narrower, random init) or a model (e.g. a pruned squeeze output, whose zeros are
    kept). Training reads back-to-back windows of ``seq_len`` tokens from the training side of
    ``data``; evaluation uses the held-out side of ``eval_data`` (default ``data``). ``dtype`` is
    the teacher's compute dtype; the student trains in float32 (bf16 autocast per
    ``config.precision``). Checkpoints go to ``checkpoint_dir`` (default ``OUT.checkpoints``) every
    ``config.checkpoint_every`` steps and are removed when the run finishes; ``resume`` continues
    from the newest one. ``teacher_cache`` names a folder of the teacher's top-k logits: made on
    first use, reused afterwards. Under torchrun every process calls this; only process 0 writes
    and returns the report (the others return None).
    """
    from squeeze.data import training_windows
    from squeeze.distill import cache as logit_cache
    from squeeze.distill.checkpoint import CheckpointDir, TrainingState, default_checkpoint_dir
    from squeeze.distill.student import (
        check_layer_map, check_same_vocabulary, check_vocab_sizes, default_layer_map, derive_student, parse_student, pruning_masks,
        resolve_layers, teacher_depth,
    )
    from squeeze.distill.trainer import (
        Distillable, TrainInputs, WindowOrder, autocast_for, final_student, start_processes, stop_processes, train,
    )

    progress = progress or NullProgress()
    watch = _Stopwatch()
    out = Path(out)
    check_output_dir(out, overwrite)
    compute_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    spec = parse_student(student)
    t_source = resolve_model(teacher, trust_remote_code=trust_remote_code)
    causal = t_source.kind == "causal"
    t_meta = meta_model(t_source)
    depth = teacher_depth(t_meta)
    spec = resolve_layers(spec, depth)
    s_source = None
    if spec.kind == "model":
        s_source = resolve_model(spec.model, trust_remote_code=trust_remote_code)
        if s_source.kind != t_source.kind:
            raise SqueezeError(f"teacher {teacher} is a {t_source.kind} model but student {spec.model} is a {s_source.kind} model")
        s_meta = meta_model(s_source)
        check_vocab_sizes(t_meta.config, s_meta.config)
        student_depth = teacher_depth(s_meta)
    else:
        student_depth = len(spec.layers) if spec.kind == "layers" else depth
    layer_map = config.layer_map
    if config.hidden_loss is not None and not layer_map:
        layer_map = default_layer_map(spec, depth, student_depth)
    check_layer_map(layer_map, student_depth, depth)
    if teacher_cache is not None:
        teacher_cache = Path(teacher_cache)
        logit_cache.check_cache_use(teacher_cache, config, causal)
    load_documents(data)
    if evaluate:
        load_documents(eval_data or data)
    if measure_speed:
        _check_speed_kind("causal" if causal else "encoder")
    checkpoints = CheckpointDir(Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out))
    if checkpoints.path.exists() and not checkpoints.path.is_dir():
        raise SqueezeError(f"checkpoint folder {checkpoints.path} exists and is a file")
    if resume and checkpoints.read_run() is None:
        raise SqueezeError(f"nothing to resume: {checkpoints.path} holds no checkpoints of a distillation run")
    if not resume and checkpoints.holds_run() and not overwrite:
        raise SqueezeError(
            f"{checkpoints.path} holds checkpoints of an earlier run: pass --resume to continue it, or --overwrite to start over"
        )

    procs, device = start_processes(device)
    if not procs.main:
        progress = NullProgress()
    try:
        if config.fsdp and procs.world < 2:
            raise SqueezeError("--fsdp shards the student over processes: start it with torchrun --nproc-per-node 2 (or more)")
        with watch.stage("load"), progress.status(f"loading {t_source.name}"):
            t_loaded = load_model(t_source, device=device, dtype=compute_dtype)
            masks: dict[str, torch.Tensor] = {}
            input_sparse_format = None
            if s_source is not None:
                s_loaded = load_model(s_source, device=device, dtype=torch.float32)
                check_same_vocabulary(t_loaded.tokenizer, s_loaded.tokenizer, t_loaded.config, s_loaded.config)
                net = s_loaded.model
                masks = pruning_masks(net)
                if masks:
                    input_sparse_format = "sparse-bitmask" if is_sparse_folder(s_source.path) else "dense"
            else:
                net = derive_student(t_loaded.model, spec, config.seed)
        net.requires_grad_(True)
        tokenizer = t_loaded.tokenizer
        seq_len = _eval_seq_len(t_loaded, seq_len)
        windows = training_windows(tokenizer, data, seq_len)
        global_batch = config.batch_size * procs.world
        if windows.shape[0] < global_batch:
            raise SqueezeError(
                f"training text {data!r} gives {windows.shape[0]} window(s) of {seq_len} tokens, fewer than one batch "
                f"({global_batch}); use more text, a smaller --batch-size or a shorter --seq-len"
            )
        eval_windows = evaluation_windows(tokenizer, eval_data or data, seq_len, eval_tokens) if evaluate else None
        fingerprint = logit_cache.windows_fingerprint(windows)
        run = {
            "teacher": f"{t_source.name} ({t_source.path})",
            "student": student,
            "data": data,
            "seq_len": seq_len,
            "windows_sha256": fingerprint,
            "processes": procs.world,
            "teacher_cache": str(teacher_cache) if teacher_cache else None,
            "config": config.trajectory() | {"layer_map": [list(p) for p in layer_map]},
        }
        resumed_from = None
        if resume:
            checkpoints.check_resumable(run)
            latest = checkpoints.latest()
            resumed_from = int(latest.name.removeprefix("step-")) if latest else None
        procs.barrier()
        if procs.main:
            if not resume:
                checkpoints.clear()
            checkpoints.remove_partial()
            if config.checkpoint_every or resume:
                checkpoints.start(run)
        procs.barrier()

        autocast = autocast_for(device, config.precision)
        cache = None
        if teacher_cache is not None:
            identity = logit_cache.cache_identity(
                run["teacher"], windows, config.cache_topk, config.cache_samples, config.temperature, config.precision, config.seed
            )
            order = WindowOrder(windows.shape[0], config.seed)
            needed = sorted(set(order.take(0, config.steps * config.grad_accum * global_batch)))
            if procs.main and not logit_cache.is_cache(teacher_cache):
                with watch.stage("teacher_cache"), progress.task(f"teacher logits → {teacher_cache}", len(needed)) as advance:
                    with atomic_output_dir(teacher_cache) as tmp:
                        logit_cache.build_cache(
                            t_loaded.model, windows, needed, identity, tmp, config.batch_size, autocast, on_batch=advance
                        )
            procs.barrier()
            cache = logit_cache.LogitCache(teacher_cache, identity, needed)

        model = Distillable(net, causal, layer_map, t_loaded.config.hidden_size).to(device)
        student_params = parameter_count(net)
        if eval_windows is not None and config.eval_every:
            periodic = eval_windows[:PERIODIC_EVAL_WINDOWS]

            def held_out(student_net: torch.nn.Module) -> dict[str, float]:
                if causal:
                    return {"eval_perplexity": compare_causal(student_net, periodic, batch_size=config.batch_size).perplexity}
                return {"eval_cosine": compare_encoder(student_net, t_loaded.model, periodic, batch_size=config.batch_size).cosine_mean}
        else:
            held_out = None
        inputs = TrainInputs(
            model=model,
            teacher=None if cache is not None else t_loaded.model,
            windows=windows,
            config=config,
            processes=procs,
            device=device,
            checkpoints=checkpoints if (config.checkpoint_every or resume) else None,
            masks=masks,
            cache=cache,
            evaluate=held_out,
            resume=resume,
        )
        with watch.stage("train"), progress.task("distilling", config.steps) as advance:
            shown = [0, time.perf_counter(), 0]  # steps shown, clock and tokens at the last update

            def on_step(step: int, entry: dict) -> None:
                now = time.perf_counter()
                rate = (entry["tokens"] - shown[2]) / max(now - shown[1], 1e-9) if shown[0] else 0.0
                info = f"loss {entry['loss']:.4f}" + (f", {rate:,.0f} tok/s" if rate else "")
                if "eval_perplexity" in entry:
                    info += f", held-out ppl {entry['eval_perplexity']:.2f}"
                advance(step - shown[0], info)
                shown[:] = [step, now, entry["tokens"]]

            state = train(inputs, TrainingState(), on_step=on_step)
        trained = final_student(model, config.fsdp, procs.main)
        if trained is None:
            procs.barrier()
            return None
        net = trained.to(device)

        accuracy = None
        if eval_windows is not None:
            accuracy = _evaluate(
                net, t_source.kind, t_loaded.model, eval_windows, eval_data or data, seq_len, config.batch_size, watch, progress,
                None, t_loaded.tokenizer, generation_prompts,
            )
        done = _Distilled(
            teacher_spec=teacher, student_spec=student, spec=spec, teacher=t_loaded, student=net, student_parameters=student_params,
            config=config, layer_map=layer_map, masks=masks, sparse_format=input_sparse_format, state=state,
            resumed_from=resumed_from, processes=procs.world, data=data, eval_data=eval_data or data,
            training_windows=windows.shape[0], seq_len=seq_len, teacher_cache=teacher_cache, accuracy=accuracy, device=device,
            dtype=dtype,
        )
        report = _write_student(out, overwrite, done, watch, progress, measure_speed)
        checkpoints.clear()
        procs.barrier()
        return report
    finally:
        stop_processes(procs)


PERIODIC_EVAL_WINDOWS = 8  # held-out windows scored at each --eval-every check; the final evaluation uses all


@dataclass
class _Distilled:
    """A finished distillation, as the writer needs it."""

    teacher_spec: str
    student_spec: str
    spec: object  # StudentSpec
    teacher: LoadedModel
    student: torch.nn.Module
    student_parameters: int
    config: DistillConfig
    layer_map: tuple[tuple[int, int], ...]
    masks: dict[str, torch.Tensor]  # pruned student: parameter name → keep mask
    sparse_format: str | None  # the pruned student's input format, kept for the output
    state: object  # TrainingState
    resumed_from: int | None
    processes: int
    data: str
    eval_data: str
    training_windows: int
    seq_len: int
    teacher_cache: Path | None
    accuracy: AccuracyReport | None
    device: str
    dtype: str


def _write_student(out: Path, overwrite: bool, done: _Distilled, watch: _Stopwatch, progress: Progress, measure_speed: bool = False) -> Report:
    """Save the trained student, its loss curve and the report into ``out``, atomically."""
    import json

    from squeeze.distill.trainer import autocast_for
    from squeeze.formats.compressed_tensors import dense_tensors, save_safetensors, write_config_files
    from squeeze.report import TrainingReport, plot_loss_curve

    config, teacher, net, state = done.config, done.teacher, done.student, done.state
    causal = teacher.source.kind == "causal"
    stored = teacher.stored_dtype
    teacher_bytes = sum(t.numel() * t.element_size() for t in checkpoint_state_dict(teacher.model, stored).values())
    notes = []
    if done.masks:
        notes.append(
            f"the student was pruned: {len(done.masks)} layer(s) kept their zeros through training "
            f"({sum(int((~m).sum()) for m in done.masks.values()):,} weights held at exactly 0)"
        )
    if done.layer_map and net.config.hidden_size != teacher.config.hidden_size:
        notes.append("the hidden-state loss trained projections onto the teacher's width; they are not part of the student")
    if not causal and (config.alpha != DistillConfig.alpha or config.temperature != DistillConfig.temperature):
        notes.append("temperature and alpha apply to language-model logits; an encoder is distilled on its embeddings")
    curve = state.curve

    def linear_bytes(model: torch.nn.Module) -> int:
        return sum(m.weight.numel() * stored.itemsize for m in model.modules() if isinstance(m, torch.nn.Linear))

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with watch.stage("save"), progress.status(f"writing {out}"):
            loading = ""
            if done.masks:
                layers = {name.removesuffix(".weight"): net.get_submodule(name.removesuffix(".weight")) for name in done.masks}
                zeros = {name: int((m.weight == 0).sum()) for name, m in layers.items()}
                structure = _sparsity_structure(layers, zeros) or "unstructured"
                sparsity = sum(zeros.values()) / sum(m.weight.numel() for m in layers.values())
                fmt = done.sparse_format or "dense"
                files = write_pruned_checkpoint(net, fmt, structure, sparsity, list(layers), tmp, teacher.tokenizer, stored)
                if fmt == "sparse-bitmask":
                    auto_class = "AutoModelForCausalLM" if causal else "AutoModel"
                    loading = "```python\n" + LOADING_SNIPPET.format(folder=out, auto_class=auto_class) + "```\n"
            else:
                write_config_files(net, tmp, None, teacher.tokenizer, stored)
                files = save_safetensors(dense_tensors(net, stored), tmp)
            (tmp / "loss_curve.json").write_text(json.dumps(curve, indent=1) + "\n")
            plot_loss_curve(curve, tmp / "loss_curve.png", f"distill {teacher.source.name} → {done.student_spec}")
        training = TrainingReport(
            teacher=teacher.source.name,
            student=done.student_spec,
            teacher_parameters=parameter_count(teacher.model),
            student_parameters=done.student_parameters,
            teacher_bytes=teacher_bytes,
            student_bytes=sum(f.stat().st_size for f in files),
            steps=state.step,
            tokens=state.tokens,
            train_seconds=state.train_seconds,
            processes=done.processes,
            loss_first=curve[0]["loss"] if curve else float("nan"),
            loss_last=curve[-1]["loss"] if curve else float("nan"),
            teacher_cache=str(done.teacher_cache) if done.teacher_cache else None,
            resumed_from_step=done.resumed_from,
        )
        loss_name = (
            (f"KD τ={config.temperature:g}, α={config.alpha:g}" if config.alpha > 0 else "cross-entropy only (α=0)")
            if causal
            else f"embedding {config.embedding_loss}"
        ) + (f" + hidden {config.hidden_loss} x{config.hidden_weight:g}" if config.hidden_loss else "")
        settings = {
            "scheme": f"{loss_name}; student {done.student_spec}",
            "student": done.spec.describe(),
            "loss": loss_name,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "hidden_loss": config.hidden_loss,
            "layer_map": [f"{s}:{t}" for s, t in done.layer_map],
            "steps": config.steps,
            "batch": f"{config.batch_size} windows x {config.grad_accum} accumulation x {done.processes} process(es) of {done.seq_len} tokens",
            "parallelism": "FSDP (student sharded)" if config.fsdp else ("DDP" if done.processes > 1 else "one process"),
            "optimizer": f"AdamW lr {config.lr:g} (warmup {config.warmup_steps} steps, cosine to {config.min_lr_ratio:g}x), "
            f"weight decay {config.weight_decay:g}, clip {config.max_grad_norm:g}",
            "precision": "bf16 autocast" if autocast_for(done.device, config.precision) is not contextlib.nullcontext else "fp32",
            "seed": config.seed,
            "training_data": f"{done.data}: {done.training_windows} windows of {done.seq_len} tokens (training side)",
            "evaluation_data": done.eval_data,
            "teacher_cache": (
                f"{done.teacher_cache} (per token: the teacher's {config.cache_topk} most likely tokens"
                + (f" and {config.cache_samples} draws from the rest)" if config.cache_samples else ")")
                if done.teacher_cache
                else None
            ),
        }
        size = SizeReport(
            parameters=training.teacher_parameters,
            compressed_parameters=done.student_parameters,
            disk_bytes_before=teacher_bytes,
            disk_bytes_after=training.student_bytes,
            memory_bytes_before=tensor_bytes(teacher.model),
            memory_bytes_after=tensor_bytes(net),
            linear_bytes_before=linear_bytes(teacher.model),
            linear_bytes_after=linear_bytes(net),
        )
        report = Report(
            pass_name="distill",
            model=_model_info(done.teacher_spec, teacher.source, teacher.model),
            settings=settings,
            size=size,
            timings_s=dict(watch.timings),
            peak_rss_bytes=peak_rss_bytes(),
            device=f"{done.device}, {done.dtype} teacher compute",
            accuracy=done.accuracy,
            notes=notes,
            training=training,
            loading=loading,
            squeeze_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if measure_speed:
            report.speed = _measure_speed(done.teacher_spec, tmp, done.eval_data, done.device.split(',')[0], watch, progress)
        write_report(report, tmp)
    return report


# ---------------------------------------------------------------------------------------------
# recipes


def plan_run(
    recipe, model: str, data: str | None = None, eval_tokens: int | None = None, seq_len: int | None = None,
    dtype: str = "float32", evaluate: bool = True, trust_remote_code: bool = False,
):
    """The recipe (a file, a Recipe or a list of stage options) with the run's overrides, and its
    checked plan; nothing is loaded but the model's config. RecipeError lists every problem."""
    import dataclasses

    from squeeze.recipes import Recipe, load_recipe, plan_recipe, recipe_from_stages

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        recipe = recipe_from_stages(list(recipe))
    overrides = {k: v for k, v in (("data", data), ("eval_tokens", eval_tokens), ("seq_len", seq_len)) if v is not None}
    for key in ("eval_tokens", "seq_len"):
        if key in overrides and overrides[key] < 1:
            raise SqueezeError(f"--{key.replace('_', '-')} must be at least 1, got {overrides[key]}")
    recipe = dataclasses.replace(recipe, **overrides)
    compute_dtype = resolve_dtype(dtype)
    return recipe, plan_recipe(recipe, model, trust_remote_code, evaluate, compute_dtype.itemsize)


STAGE_FILE = "stage.json"  # written into a stage folder once it is complete: what made it


def run_recipe(
    recipe,
    model: str,
    out: Path,
    data: str | None = None,
    eval_tokens: int | None = None,
    seq_len: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    evaluate: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    on_stage: Callable | None = None,
    generation_prompts: int = GENERATION_PROMPTS,
) -> dict:
    """Run the stages of ``recipe`` on ``model`` in order; return the summary (also ``out/summary.json``).

    ``recipe`` is a YAML file, a Recipe, or a list of stage options (QuantizeStage, PruneStage,
    DistillStage). ``data``, ``eval_tokens`` and ``seq_len`` override the recipe's. Stage N reads
    what stage N-1 wrote and is scored against ``model``. Stages are written into ``OUT.partial/``
    (each stage folder atomically), which becomes ``out`` with summary.json/md/png at the end. If a
    stage fails or is interrupted, the finished ones stay in ``OUT.partial`` and ``resume``
    continues from the first stage whose folder is missing or was made from other settings (a
    distill stage also continues from its checkpoints). ``on_stage(planned)`` is called as each
    stage starts or is reused.
    """
    import json
    import os
    import shutil

    from squeeze.distill.checkpoint import CheckpointDir, default_checkpoint_dir
    from squeeze.evaluate import reset_peak_rss
    from squeeze.recipes import DistillStage, QuantizeStage

    progress = progress or NullProgress()
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SqueezeError("squeeze run is one process; to distill under torchrun, run that stage with squeeze distill")
    check_output_dir(out, overwrite)
    resolve_device(device)
    recipe, plan = plan_run(recipe, model, data, eval_tokens, seq_len, dtype, evaluate, trust_remote_code)
    staging = out.parent / f"{out.name}.partial"
    if staging.exists() and not staging.is_dir():
        raise SqueezeError(f"{staging} exists and is a file")
    if resume and not staging.is_dir():
        raise SqueezeError(f"nothing to resume: {staging} does not exist")
    if staging.exists() and not resume:
        if not overwrite:
            raise SqueezeError(f"{staging} holds the stages of an unfinished run: pass --resume to continue it, or --overwrite to start over")
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)

    settings = {
        "model": model, "data": recipe.data, "eval_tokens": recipe.eval_tokens, "seq_len": recipe.seq_len,
        "dtype": dtype, "evaluate": evaluate,
    }
    reports: list[dict] = []
    reusing = True
    try:
        for entry in plan:
            folder = staging / entry.folder
            stages = [{p.stage.pass_name: p.stage.model_dump(mode="json")} for p in plan[: entry.index + 1]]
            identity = json.loads(json.dumps({"settings": settings, "stages": stages}))  # as stage.json holds it
            done = folder / STAGE_FILE
            if reusing and done.is_file() and json.loads(done.read_text()).get("identity") == identity:
                if on_stage:
                    on_stage(entry, reused=True)
                reports.append(json.loads((folder / "report.json").read_text()))
                continue
            reusing = False
            for stale in staging.iterdir():  # this stage and every later one are made again (a distill stage may resume)
                number = int(stale.name[:2]) if stale.name[:2].isdigit() else 0
                if number > entry.index + 1 or (number == entry.index + 1 and not stale.name.endswith(".checkpoints")):
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            if on_stage:
                on_stage(entry, reused=False)
            source = model if entry.index == 0 else str(staging / plan[entry.index - 1].folder)
            stage = entry.stage
            reset_peak_rss()
            common = dict(eval_tokens=recipe.eval_tokens, seq_len=recipe.seq_len, device=device, dtype=dtype, evaluate=evaluate,
                          overwrite=True, trust_remote_code=trust_remote_code, progress=progress,
                          generation_prompts=generation_prompts)
            try:
                if isinstance(stage, DistillStage):
                    teacher = {"original": model, "previous": source}.get(stage.teacher, stage.teacher)
                    student = source if stage.student == "previous" else stage.student
                    checkpoints = CheckpointDir(default_checkpoint_dir(folder))
                    report = distill(
                        teacher, student, folder, entry.config, data=stage.data or recipe.data, eval_data=recipe.data,
                        resume=resume and checkpoints.read_run() is not None,
                        teacher_cache=Path(stage.teacher_cache) if stage.teacher_cache else None, **common,
                    )
                else:
                    config = entry.config
                    if isinstance(stage, QuantizeStage) and not entry.shapes_known and stage.needs_shapes:
                        config = stage.config(meta_model(resolve_model(source, trust_remote_code=trust_remote_code)))
                    run = quantize if isinstance(stage, QuantizeStage) else prune
                    report = run(
                        source, folder, config, data=recipe.data, calibration_data=stage.calib_data,
                        calibration_samples=stage.calib_samples, batch_size=stage.batch_size,
                        reference=model if entry.index else None, **common,
                    )
            except SqueezeError as exc:
                kept = f"; the finished stages are kept in {staging}: rerun with --resume to continue" if entry.index else ""
                raise SqueezeError(f"stage {entry.index + 1} ({entry.folder}): {exc}{kept}") from None
            assert report is not None
            reports.append(report.to_dict())
            done.write_text(json.dumps({"identity": identity, "memory_estimate_bytes": entry.memory_bytes}, indent=1) + "\n")
        summary = _write_summary(staging, recipe, plan, reports, settings)
    except BaseException:
        _keep_finished(staging)
        raise
    publish_dir(staging, out, overwrite)
    return summary


def _keep_finished(staging: Path) -> None:
    """After a failed or interrupted run: drop what is not a finished stage (or a distill stage's
    checkpoints); drop the folder entirely when nothing finished."""
    import shutil

    for item in staging.iterdir():
        finished = (item / STAGE_FILE).is_file() or (item.name.endswith(".checkpoints") and any(item.iterdir()))
        if not finished:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    if not any(staging.iterdir()):
        staging.rmdir()


def _write_summary(folder: Path, recipe, plan, reports: list[dict], settings: dict) -> dict:
    """summary.json, summary.md and summary.png: the original and every stage, side by side."""
    import dataclasses
    import json

    from squeeze import compare

    rows = [dataclasses.replace(compare.original_row(reports[0]), name=_reference_name(settings["model"]))]
    original = rows[0].name

    def against_original(entry) -> bool:
        """The report compared with its input or teacher, and that model was the original."""
        teacher = getattr(entry.stage, "teacher", None)  # distill only
        return teacher == "original" or (entry.index == 0 and teacher in (None, "previous"))

    rows += [
        compare.stage_row(report, entry.folder, memory_estimate=entry.memory_bytes, compared_with=original if against_original(entry) else None)
        for entry, report in zip(plan, reports)
    ]
    title = f"squeeze recipe {recipe.name}: {settings['model']}"
    summary = {
        "recipe": recipe.name,
        "source": str(recipe.source) if recipe.source else None,
        "description": recipe.description,
        "settings": settings,
        "stages": [{"folder": e.folder, "pass": e.stage.pass_name, "options": e.stage.model_dump(exclude_defaults=True)} for e in plan],
        "rows": [row.to_dict() for row in rows],
        "squeeze_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(compare.to_markdown(rows, title))
    compare.plot(rows, folder / "summary.png", title)
    return summary


@dataclass
class EvalResult:
    """``squeeze eval``: one AccuracyReport per text source, the numbers a pass report gives."""

    model: str
    reference: str | None
    kind: str
    device: str
    rows: list[AccuracyReport]
    seconds: float
    peak_rss_bytes: int

    def to_dict(self) -> dict:
        import dataclasses

        rows = []
        for row in self.rows:
            entry = dataclasses.asdict(row)
            entry["perplexity_change"] = row.perplexity_change
            rows.append(entry)
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "rows"}, "rows": rows}


def evaluate_model(
    model: str,
    reference: str | None = None,
    data: list[str] | tuple[str, ...] = ("wikipedia",),
    eval_tokens: int = 16384,
    seq_len: int = 512,
    batch_size: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    generation_prompts: int = GENERATION_PROMPTS,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on each text source and, against ``reference``, KL, top-1 agreement
    and generation agreement (causal LMs) or embedding cosine (encoders): the implementation the
    pass reports use, on the same evaluation windows for the same source, tokens and window length."""
    from squeeze.distill.student import check_vocab_sizes

    progress = progress or NullProgress()
    watch = _Stopwatch()
    if not data:
        raise SqueezeError("give at least one text source (--data)")
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    source = resolve_model(model, trust_remote_code=trust_remote_code)
    ref_source = None
    if reference is not None:
        ref_source = resolve_model(reference, trust_remote_code=trust_remote_code)
        if ref_source.kind != source.kind:
            raise SqueezeError(f"{model} is {'a causal LM' if source.kind == 'causal' else 'an encoder'} but the reference {reference} is not")
        check_vocab_sizes(meta_model(ref_source).config, meta_model(source).config)
    elif source.kind == "encoder":
        raise SqueezeError(f"{model} is an encoder: it has no perplexity; give --reference MODEL to compare its embeddings with")
    for name in data:
        load_documents(name)
    start = time.perf_counter()
    with progress.status(f"loading {source.name}"):
        loaded = load_model(source, device=device, dtype=compute_dtype)
    ref_model = None
    if ref_source is not None:
        with progress.status(f"loading the reference {ref_source.name}"):
            ref_model = load_model(ref_source, device=device, dtype=compute_dtype).model
    length = _eval_seq_len(loaded, seq_len)
    rows = []
    for name in data:
        windows = evaluation_windows(loaded.tokenizer, name, length, eval_tokens)
        if ref_model is None:
            with progress.task(f"evaluating on {name}", windows.shape[0]) as advance:
                cmp = compare_causal(loaded.model, windows, batch_size=batch_size, on_batch=advance)
            rows.append(AccuracyReport(data=name, windows=windows.shape[0], seq_len=length, tokens=cmp.tokens, perplexity_after=cmp.perplexity))
        else:
            rows.append(_evaluate(
                loaded.model, source.kind, ref_model, windows, name, length, batch_size, watch, progress,
                reference, loaded.tokenizer, generation_prompts,
            ))
    return EvalResult(
        model=model, reference=reference, kind=source.kind, device=f"{device}, {dtype}", rows=rows,
        seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
    )


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """The prompts of ``squeeze generate``: ``prompt``, or one per non-empty line of ``prompts_file``."""
    if (prompt is None) == (prompts_file is None):
        raise SqueezeError("give --prompt TEXT or --prompts FILE (one prompt per line)")
    if prompt is not None:
        if not prompt.strip():
            raise SqueezeError("--prompt is empty")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise SqueezeError(f"prompts file {path} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise SqueezeError(f"prompts file {path} is not UTF-8 text") from None
    if not lines:
        raise SqueezeError(f"prompts file {path} has no prompts")
    return lines


def generate_side_by_side(
    models: list[str],
    prompts: list[str],
    sampling,
    max_new_tokens: int = 64,
    seed: int = 0,
    chat: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    kernels: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Continue every prompt with every model, with one sampler and one seed for all: greedy at
    temperature 0, else the same random stream per prompt for each model. ``chat`` wraps each
    prompt in the tokenizer's chat template. ``kernels`` runs quantized checkpoints on integer
    kernels (faster; float rounding differs from the pass's evaluation)."""
    from squeeze.generate import generate
    from squeeze.runtime import accelerate

    progress = progress or NullProgress()
    if max_new_tokens < 1:
        raise SqueezeError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype)
    sources = [resolve_model(spec, trust_remote_code=trust_remote_code) for spec in models]
    for source in sources:
        if source.kind != "causal":
            raise SqueezeError(f"{source.spec} is an encoder: it does not generate text")
    first = meta_model(sources[0]).config
    for source in sources[1:]:
        from squeeze.distill.student import check_vocab_sizes

        check_vocab_sizes(first, meta_model(source).config)
    labels = [spec if models.count(spec) == 1 else f"{spec} ({i + 1})" for i, spec in enumerate(models)]
    outputs: dict[str, list[dict]] = {}
    for label, spec, source in zip(labels, models, sources):
        with progress.status(f"loading {source.name}"):
            loaded = load_model(source, device=device, dtype=compute_dtype)
        if kernels:
            accelerate(loaded.model)
        tokenizer = loaded.tokenizer
        rows = []
        for index, text in enumerate(prompts):
            if chat:
                if not getattr(tokenizer, "chat_template", None):
                    raise SqueezeError(f"{spec} has no chat template; drop --chat")
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
                ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
            else:
                ids = tokenizer(text, return_tensors="pt").input_ids
            start = time.perf_counter()
            with progress.status(f"{source.name}: prompt {index + 1} of {len(prompts)}"):
                new = generate(loaded.model, ids.to(device), max_new_tokens, sampling, seed=seed + index, eos_token_id=tokenizer.eos_token_id)
            seconds = time.perf_counter() - start
            rows.append({"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new), "tokens_per_s": len(new) / seconds})
        outputs[label] = rows
        del loaded
    return {
        "models": models, "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
        "seed": seed, "max_new_tokens": max_new_tokens, "chat": chat, "kernels": kernels,
        "prompts": [{"prompt": p, "outputs": {label: outputs[label][i] for label in labels}} for i, p in enumerate(prompts)],
    }
