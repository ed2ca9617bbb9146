"""The ``squeeze`` command line: parse options, build a config, call the API, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from squeeze import __version__
from squeeze.errors import SqueezeError
from squeeze.progress import ConsoleProgress, NullProgress

app = typer.Typer(
    name="squeeze",
    help="Compress transformer models and report, in numbers, what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn, *args, interrupted: str = "interrupted; no output was written", **kwargs):
    """Call the API; user errors become one red line and exit 2, Ctrl-C exits 130 with nothing written."""
    try:
        return fn(*args, **kwargs)
    except SqueezeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(interrupted, code=130)


def _at_least_one(*options: tuple[str, int]) -> None:
    """One red line for the first count option below 1."""
    for name, value in options:
        if value < 1:
            _fail(f"{name} must be at least 1, got {value}")


def _version(value: bool) -> None:
    if value:
        print(f"squeeze {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """Compress transformer models and report, in numbers, what it cost."""


TrustOption = Annotated[
    bool, typer.Option("--trust-remote-code", help="Let transformers run Python code shipped with the model.")
]
ModelArg = Annotated[str, typer.Argument(help="Built-in name (smollm2, minilm), local HF directory, .gguf file, or hub id.")]
# options every pass takes
DataOption = Annotated[str, typer.Option(help="Evaluation text: wikipedia, bbc, shakespeare, or a .txt file/folder.")]
EvalTokensOption = Annotated[int, typer.Option(help="Evaluation tokens (whole windows of --seq-len).")]
SeqLenOption = Annotated[int, typer.Option(help="Tokens per window.")]
BatchSizeOption = Annotated[int, typer.Option(help="Windows per forward pass.")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
DtypeOption = Annotated[str, typer.Option(help="Compute dtype for calibration and evaluation: float32, bfloat16 or float16.")]
NoEvalOption = Annotated[bool, typer.Option("--no-eval", help="Skip the accuracy evaluation.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no table.")]
MeasureSpeedOption = Annotated[bool, typer.Option("--measure-speed", help="Also measure prefill/decode tokens/s and memory of input and output (as squeeze bench-infer; causal LMs).")]


@app.command()
def quantize(
    model: ModelArg,
    method: Annotated[str, typer.Option(help="rtn (round-to-nearest, no data), gptq, awq (weight-only, activation-aware scales) or smoothquant (W8A8); all but rtn calibrate block by block.")] = "rtn",
    mode: Annotated[Optional[str], typer.Option(help="Weight scales: per-tensor, per-channel (per output row) or per-group (default per-channel; per-group for awq).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Weight bits, 2..8 (default 8; 4 for awq).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Input columns per scale with --mode per-group (default 128 where it divides every targeted layer, else 64, 32 or 16).")] = None,
    asym: Annotated[Optional[bool], typer.Option("--asym/--sym", help="Asymmetric weights (scale and zero point); default symmetric, asymmetric for awq.")] = None,
    act: Annotated[str, typer.Option(help="Activations: none (W*A16), per-token (dynamic) or per-tensor (static, calibrated).")] = "none",
    act_asym: Annotated[bool, typer.Option("--act-asym", help="Asymmetric activations (scale and zero point).")] = False,
    scale_dtype: Annotated[str, typer.Option(help="Storage type of weight scales: auto (float16; float32 for --asym weight-only), float16, bfloat16 or float32.")] = "auto",
    damp_percent: Annotated[float, typer.Option(help="GPTQ: damping added to the Hessian diagonal, as a fraction of its mean.")] = 0.01,
    block_size: Annotated[int, typer.Option(help="GPTQ: columns updated together.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="GPTQ: quantize the inputs with the most energy first, group scales fixed up front (default on).")] = True,
    true_sequential: Annotated[bool, typer.Option("--true-sequential/--no-true-sequential", help="GPTQ: calibrate each layer on the outputs of the layers already quantized in its block.")] = False,
    awq_grid: Annotated[int, typer.Option(help="AWQ: scale ratios tried per fold (0, 1/n, ..., (n-1)/n).")] = 20,
    awq_clip: Annotated[bool, typer.Option("--awq-clip/--no-awq-clip", help="AWQ: search a smaller clip range per weight group (never q/k).")] = True,
    alpha: Annotated[float, typer.Option(help="SmoothQuant: share of the activation range moved into the weights, 0..1.")] = 0.5,
    smooth_fallback: Annotated[bool, typer.Option("--smooth-fallback", help="SmoothQuant: quantize without smoothing where no norm can be folded.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="Checkpoint format: compressed-tensors (transformers, vLLM), gptq (GPTQModel, transformers + optimum), bnb-int8 or bnb-nf4 (transformers + bitsandbytes).")] = "compressed-tensors",
    target: Annotated[list[str], typer.Option(help="Quantize only Linear layers matching this glob or re:regex (repeatable).")] = [],
    ignore: Annotated[Optional[list[str]], typer.Option(help="Leave matching layers in full precision (repeatable) (default: lm_head and classifier heads).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default ./MODEL-SCHEME).")] = None,
    data: DataOption = "wikipedia",
    calib_data: Annotated[Optional[str], typer.Option(help="Calibration text for static activation scales (default: the --data text).")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows of --seq-len tokens (GPTQ and static activation scales).")] = 128,
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    batch_size: BatchSizeOption = 2,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    measure_speed: MeasureSpeedOption = False,
) -> None:
    """Quantize (round-to-nearest, GPTQ, AWQ or SmoothQuant) to a compressed-tensors, GPTQ or bitsandbytes checkpoint, with a memory and accuracy report."""
    from squeeze.api import quantize as run_quantize
    from squeeze.recipes import QuantizeStage

    _at_least_one(("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size), ("--calib-samples", calib_samples))
    stage = QuantizeStage(
        method=method, mode=mode, bits=bits, group_size=group_size, asym=asym, act=act, act_asym=act_asym,
        scale_dtype=scale_dtype, damp_percent=damp_percent, block_size=block_size, act_order=act_order,
        true_sequential=true_sequential, awq_grid=awq_grid, awq_clip=awq_clip, alpha=alpha, smooth_fallback=smooth_fallback,
        format=fmt, targets=tuple(target), ignore=tuple(ignore) if ignore is not None else None,
    )
    shapes = _run(_meta_model, model, trust_remote_code) if stage.needs_shapes else None
    config = _run(stage.config, shapes)
    scheme, mode = config.scheme, stage.resolved(None).mode
    if out_dir is None:
        stem = _model_stem(model)
        suffix = f"{scheme.name}-{mode}" + (f"{scheme.weights.group_size}" if scheme.weights.group_size else "")
        suffix += f"-{method}" if method != "rtn" else ""
        suffix = "nf4" if fmt == "bnb-nf4" else suffix
        suffix += f"-{fmt}" if fmt != "compressed-tensors" else ""
        out_dir = Path(f"{stem}-{suffix}")
    _run_pass(
        run_quantize, model, out_dir, config, fmt, as_json, quiet,
        data=data, calibration_data=calib_data, eval_tokens=eval_tokens, seq_len=seq_len,
        calibration_samples=calib_samples, batch_size=batch_size, device=device, dtype=dtype,
        evaluate=not no_eval, overwrite=overwrite, trust_remote_code=trust_remote_code, measure_speed=measure_speed,
    )


def _run_pass(fn, model: str, out_dir: Path, config, fmt: str, as_json: bool, quiet: bool, **options) -> None:
    """Run one pass of the API with progress on stderr; print its report as JSON or as tables."""
    progress = NullProgress() if quiet else ConsoleProgress(err)
    report = _run(fn, model, out_dir, config, progress=progress, **options)
    _print_report(report, out_dir, f"{fmt} safetensors, config.json, report.json, report.md", as_json, quiet)


def _print_report(report, out_dir: Path, written: str, as_json: bool, quiet: bool) -> None:
    from squeeze.report import to_rich

    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    elif not quiet:
        out.print(to_rich(report))
        out.print(f"wrote {out_dir}/ ({written})")


def _meta_model(model: str, trust_remote_code: bool):
    """The model's layers on the meta device (shapes only, no weights read)."""
    from squeeze.models import meta_model, resolve_model

    return meta_model(resolve_model(model, trust_remote_code=trust_remote_code))


def _model_stem(model: str) -> str:
    """The model's name for a default output directory: file stem of a GGUF, last path part otherwise."""
    return Path(model).stem if model.endswith(".gguf") else Path(model.rstrip("/")).name


def _layer_sparsity(entries: list[str]) -> dict[str, float]:
    """PATTERN=SPARSITY entries in order; a pattern given twice moves to its last place (the last match wins)."""
    parsed: dict[str, float] = {}
    for entry in entries:
        pattern, sep, value = entry.rpartition("=")
        try:
            if not sep or not pattern:
                raise ValueError
            parsed.pop(pattern, None)
            parsed[pattern] = float(value)
        except ValueError:
            _fail(f"--layer-sparsity takes PATTERN=SPARSITY (for example '*.self_attn.*=0.3'), got {entry!r}")
    return parsed


@app.command()
def prune(
    model: ModelArg,
    method: Annotated[str, typer.Option(help="magnitude (smallest |W|, no data), wanda (|W| times input-feature norm) or sparsegpt (Hessian-weighted, updates the surviving weights); the last two calibrate block by block.")] = "magnitude",
    sparsity: Annotated[Optional[float], typer.Option(help="Share of weights removed per layer, in [0, 1) (default 0.5; an N:M pattern sets it).")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="N:M structure, e.g. 2:4 or 4:8: keep N of every M consecutive input weights.")] = None,
    scope: Annotated[str, typer.Option(help="magnitude: rank weights per layer, or across all targeted layers at once (global).")] = "layer",
    layer_sparsity: Annotated[list[str], typer.Option(help="PATTERN=SPARSITY for matching layers, repeatable, the last match wins; 0 leaves a layer dense.")] = [],
    sparsity_ramp: Annotated[float, typer.Option(help="Rule over depth: the first block gets sparsity - ramp, the last sparsity + ramp, linear between.")] = 0.0,
    block_size: Annotated[int, typer.Option(help="SparseGPT: columns whose mask is chosen together.")] = 128,
    damp_percent: Annotated[float, typer.Option(help="SparseGPT: damping added to the Hessian diagonal, as a fraction of its mean.")] = 0.01,
    fmt: Annotated[str, typer.Option("--format", help="sparse-bitmask (compressed-tensors layout, smaller on disk) or dense (zeros stored, loads with from_pretrained).")] = "sparse-bitmask",
    target: Annotated[list[str], typer.Option(help="Prune only Linear layers matching this glob or re:regex (repeatable).")] = [],
    ignore: Annotated[Optional[list[str]], typer.Option(help="Leave matching layers dense (repeatable) (default: lm_head and classifier heads).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default ./MODEL-METHOD-SPARSITY).")] = None,
    data: DataOption = "wikipedia",
    calib_data: Annotated[Optional[str], typer.Option(help="Calibration text for Wanda and SparseGPT (default: the --data text).")] = None,
    calib_samples: Annotated[int, typer.Option(help="Wanda, SparseGPT: calibration windows of --seq-len tokens.")] = 128,
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    batch_size: BatchSizeOption = 2,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    measure_speed: MeasureSpeedOption = False,
) -> None:
    """Prune (magnitude, Wanda or SparseGPT; unstructured or N:M) to a sparse checkpoint, with a memory and accuracy report."""
    from squeeze.api import prune as run_prune
    from squeeze.recipes import PruneStage

    _at_least_one(("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size))
    if calib_samples < 0:
        _fail(f"--calib-samples must not be negative, got {calib_samples}")
    stage = PruneStage(
        method=method, sparsity=sparsity, pattern=pattern, scope=scope, layer_sparsity=_layer_sparsity(layer_sparsity),
        sparsity_ramp=sparsity_ramp, targets=tuple(target), ignore=tuple(ignore) if ignore is not None else None,
        format=fmt, block_size=block_size, damp_percent=damp_percent,
    )
    config = _run(stage.config)
    if out_dir is None:
        stem = _model_stem(model)
        amount = config.pattern.replace(":", "of") if config.pattern else f"{round(100 * (config.sparsity or 0))}"
        out_dir = Path(f"{stem}-{method}-{amount}" + ("-dense" if fmt == "dense" else ""))
    _run_pass(
        run_prune, model, out_dir, config, fmt, as_json, quiet,
        data=data, calibration_data=calib_data, eval_tokens=eval_tokens, seq_len=seq_len,
        calibration_samples=calib_samples, batch_size=batch_size, device=device, dtype=dtype,
        evaluate=not no_eval, overwrite=overwrite, trust_remote_code=trust_remote_code, measure_speed=measure_speed,
    )

@app.command()
def distill(
    teacher: Annotated[str, typer.Argument(help="The model to imitate: built-in name, HF directory, .gguf file or hub id.")],
    student: Annotated[str, typer.Argument(help="layers:K (K evenly spaced teacher blocks, teacher weights), layers:I,J,... (those blocks), depth:F (that share of the blocks, e.g. depth:0.5), width:F (hidden/MLP sizes x F, random init), or a model path (e.g. a squeeze prune output: its zeros are kept).")],
    data: Annotated[str, typer.Option(help="Training text (its training side) and, unless --eval-data, evaluation text (its held-out side): wikipedia, bbc, shakespeare, or a .txt file/folder.")] = "wikipedia",
    eval_data: Annotated[Optional[str], typer.Option(help="Evaluation text, if not the held-out side of --data.")] = None,
    temperature: Annotated[float, typer.Option(help="KD temperature τ: both distributions are softened by it; the KD term is scaled by τ².")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the KD term; 1 - alpha weighs next-token cross-entropy (0: plain training).")] = 0.5,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 100 unless --tokens).")] = None,
    tokens: Annotated[Optional[float], typer.Option(help="Training tokens instead of --steps (e.g. 2e6); rounded up to whole steps.")] = None,
    grad_accum: Annotated[int, typer.Option(help="Forward passes accumulated per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on Linear matrices (not norms, biases, embeddings).")] = 0.01,
    warmup: Annotated[float, typer.Option(help="Share of the steps with linear warmup; cosine decay after.")] = 0.05,
    min_lr_ratio: Annotated[float, typer.Option(help="Learning rate at the last step, as a share of --lr.")] = 0.1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for data order and initialisation: the same seed gives the same student.")] = 0,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA with bf16, else fp32), fp32 or bf16.")] = "auto",
    hidden_loss: Annotated[Optional[str], typer.Option(help="Also match hidden states: cosine or mse (learned projections if the widths differ).")] = None,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state loss.")] = 1.0,
    layer_map: Annotated[Optional[str], typer.Option(help="STUDENT:TEACHER block pairs for the hidden loss, e.g. 0:1,1:3 (default: each kept block to its origin).")] = None,
    embedding_loss: Annotated[str, typer.Option(help="Encoders: loss between mean-pooled embeddings, cosine or mse.")] = "cosine",
    checkpoint_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N optimizer steps (0: none).")] = 0,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept (the newest).")] = 2,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Where checkpoints go (default OUT.checkpoints; removed when the run finishes).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint; ends with the weights an uninterrupted run would have.")] = False,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity (encoders: cosine) on 8 windows every N steps (0: only at the end).")] = 0,
    teacher_cache: Annotated[Optional[Path], typer.Option(help="Folder of the teacher's top-k logits: made on first use, then training reads it instead of running the teacher.")] = None,
    cache_topk: Annotated[int, typer.Option(help="Teacher cache: the teacher's most likely tokens stored per position (exact log-probabilities).")] = 16,
    cache_samples: Annotated[int, typer.Option(help="Teacher cache: draws per position from the teacher's distribution off those tokens (an unbiased estimate of the rest; 0: top-k only, a lower bound).")] = 48,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard the student, its gradients and AdamW moments over the processes (FSDP) instead of replicating it (DDP).")] = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory (default ./TEACHER-distill-STUDENT).")] = None,
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass, per process.")] = 4,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Teacher compute dtype: float32, bfloat16 or float16 (the student trains in float32).")] = "float32",
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    measure_speed: MeasureSpeedOption = False,
) -> None:
    """Distill TEACHER into STUDENT (temperature KD + cross-entropy, or embedding loss for encoders); resumable; runs under torchrun."""
    import os

    from squeeze.api import distill as run_distill
    from squeeze.distill.checkpoint import default_checkpoint_dir
    from squeeze.recipes import DistillStage

    _at_least_one(("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size), ("--grad-accum", grad_accum))
    if steps is not None and tokens is not None:
        _fail("give --steps or --tokens, not both")
    if tokens is not None and not tokens >= 1:
        _fail(f"--tokens must be at least 1, got {tokens:g}")
    stage = DistillStage.model_construct(
        teacher=teacher, student=student, data=data, temperature=temperature, alpha=alpha, steps=steps, tokens=tokens,
        grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, warmup=warmup, min_lr_ratio=min_lr_ratio,
        max_grad_norm=max_grad_norm, seed=seed, precision=precision, hidden_loss=hidden_loss, hidden_weight=hidden_weight,
        layer_map=layer_map, embedding_loss=embedding_loss, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, eval_every=eval_every, teacher_cache=None, cache_topk=cache_topk,
        cache_samples=cache_samples, batch_size=batch_size,
    )
    config = _run(stage.config, seq_len, int(os.environ.get("WORLD_SIZE", "1")), fsdp)
    if out_dir is None:
        out_dir = Path(f"{_model_stem(teacher)}-distill-{_model_stem(student).replace(':', '').replace(',', '-')}")
    main_process = os.environ.get("RANK", "0") == "0"
    progress = ConsoleProgress(err) if main_process and not quiet else NullProgress()
    checkpoints = checkpoint_dir or default_checkpoint_dir(out_dir)
    hint = f"; continue from the last checkpoint in {checkpoints} with --resume" if checkpoint_every else ""
    report = _run(
        run_distill, teacher, student, out_dir, config, interrupted=f"interrupted; no output was written{hint}", data=data, eval_data=eval_data, eval_tokens=eval_tokens,
        seq_len=seq_len, device=device, dtype=dtype, evaluate=not no_eval, overwrite=overwrite, resume=resume,
        checkpoint_dir=checkpoint_dir, teacher_cache=teacher_cache, trust_remote_code=trust_remote_code, progress=progress,
        measure_speed=measure_speed,
    )
    if report is None:
        return
    _print_report(report, out_dir, "safetensors, config.json, report.json, report.md, loss_curve.json/png", as_json, quiet)


@app.command()
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Architecture, parameter count and the memory the weights need at fp32/bf16/int8/int4."""
    from squeeze.models import inspect_model, resolve_model

    info = _run(lambda: inspect_model(resolve_model(model, trust_remote_code=trust_remote_code)))
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    table = Table(title=f"{info.get('name', model)}", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in info.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                table.add_row(f"{key} {sub}", _human(v, sub))
        else:
            table.add_row(key, _human(value, key))
    out.print(table)


def _human(value, key: str) -> str:
    if isinstance(value, int) and ("bytes" in key or key in ("fp32", "bf16", "int8", "int4")):
        return f"{value / 1024**2:,.1f} MiB ({value:,} bytes)"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/): the passes to chain, in order.")],
    model: Annotated[str, typer.Option(help="Model to compress: built-in name (smollm2, minilm), HF directory, .gguf file or hub id.")] = "smollm2",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory, one NN-stage folder per stage plus summary.md/json/png (default ./RECIPE-MODEL).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Evaluation text of every stage (default: the recipe's, else wikipedia).")] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help="Evaluation tokens per stage (default: the recipe's, else 16384).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per window for calibration, training and evaluation (default: the recipe's, else 512).")] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe and print the plan (inputs, tokens, memory estimate); run nothing.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT.partial, reusing the stages that finished with the same settings.")] = False,
    no_eval: NoEvalOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Run a recipe: prune, distill and quantize in one chain, each stage scored against the original; a summary table and plot at the end."""
    from squeeze.api import plan_run, run_recipe

    if out_dir is None:
        out_dir = Path(f"{recipe.stem}-{_model_stem(model)}")
    if dry_run:
        loaded, plan = _run(plan_run, recipe, model, data, eval_tokens, seq_len, dtype, not no_eval, trust_remote_code)
        _print_plan(loaded, plan, model, out_dir, as_json)
        return
    progress = NullProgress() if quiet else ConsoleProgress(err)

    def announce(entry, reused: bool) -> None:
        if not quiet:
            verb = "reusing" if reused else "running"
            err.print(f"[bold]stage {entry.index + 1}[/]: {verb} {entry.stage.pass_name} → {out_dir}.partial/{entry.folder}", highlight=False)

    summary = _run(
        run_recipe, recipe, model, out_dir, data=data, eval_tokens=eval_tokens, seq_len=seq_len, device=device, dtype=dtype,
        evaluate=not no_eval, overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code, progress=progress,
        on_stage=announce,
        interrupted=f"interrupted; finished stages are kept in {out_dir}.partial (continue with --resume); nothing was written to {out_dir}",
    )
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    elif not quiet:
        from squeeze import compare

        rows = [compare.Row.from_dict(row) for row in summary["rows"]]
        out.print(compare.to_rich(rows, f"recipe {summary['recipe']}: {model}"))
        out.print(f"wrote {out_dir}/ (one folder per stage, summary.md, summary.json, summary.png)")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.6g}"


def _print_plan(recipe, plan, model: str, out_dir: Path, as_json: bool) -> None:
    def settings(stage) -> str:
        options = stage.model_dump(exclude_defaults=True)
        return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"

    def reads(entry) -> str:
        parts = []
        if entry.calibration_tokens:
            parts.append(f"calibration {entry.calibration_tokens:,}")
        if entry.training_tokens:
            parts.append(f"training {entry.training_tokens:,} ({entry.config.steps} steps)")
        if entry.evaluation_tokens:
            parts.append(f"evaluation {entry.evaluation_tokens:,}")
        return ", ".join(parts) or "-"

    stages = [
        {
            "stage": entry.index + 1, "folder": entry.folder, "pass": entry.stage.pass_name, "input": entry.input,
            "options": entry.stage.model_dump(exclude_defaults=True), "calibration_tokens": entry.calibration_tokens,
            "training_tokens": entry.training_tokens, "evaluation_tokens": entry.evaluation_tokens,
            "memory_estimate_bytes": entry.memory_bytes,
        }
        for entry in plan
    ]
    if as_json:
        sys.stdout.write(json.dumps({"recipe": recipe.name, "model": model, "out": str(out_dir), "data": recipe.data,
                                     "seq_len": recipe.seq_len, "eval_tokens": recipe.eval_tokens, "stages": stages}, indent=2) + "\n")
        return
    table = Table(title=f"plan: recipe {recipe.name} on {model} → {out_dir}/ (nothing run)", title_justify="left")
    for name in ("#", "stage folder", "input", "options", "tokens read", "memory ≈"):
        table.add_column(name, overflow="fold")
    for entry in plan:
        table.add_row(
            str(entry.index + 1), entry.folder, entry.input, settings(entry.stage), reads(entry), f"{entry.memory_bytes / 2**30:.1f} GiB",
        )
    out.print(table)
    out.print(f"evaluation text: {recipe.data}, windows of {recipe.seq_len} tokens; every stage is scored against {model}")
    out.print("memory ≈ is an estimate of the peak RAM of each stage; the summary shows it next to the measured peak")


@app.command()
def report(
    folders: Annotated[list[Path], typer.Argument(help="Output folders of squeeze runs: recipe runs (summary.json) or single passes (report.json).")],
    plot: Annotated[Path, typer.Option(help="Where the size-vs-perplexity PNG goes.")] = Path("squeeze-report.png"),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Only the table.")] = False,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table as markdown to this file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing plot or markdown file.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Compare finished runs side by side: size, bits per weight, perplexity, KL, time, memory; and a plot of size against perplexity."""
    from squeeze import compare

    files = ([] if no_plot else [plot]) + ([markdown] if markdown else [])
    for file in files:
        if file.exists() and not overwrite:
            _fail(f"{file} already exists; pass --overwrite to replace it")
        if file.exists() and file.is_dir():
            _fail(f"{file} is a folder, not a file")
        if not file.absolute().parent.is_dir():
            _fail(f"cannot write {file}: the folder {file.parent} does not exist")
    rows = compare.merge_originals([row for folder in folders for row in _run(compare.load_rows, folder)])
    title = "squeeze runs compared"
    if markdown:
        markdown.write_text(compare.to_markdown(rows, title))
    if not no_plot:
        compare.plot(rows, plot, title)
    if as_json:
        sys.stdout.write(json.dumps([row.to_dict() for row in rows], indent=2) + "\n")
        return
    out.print(compare.to_rich(rows, title))
    if files:
        out.print("wrote " + ", ".join(str(f) for f in files))


@app.command()
def bench(
    suite: Annotated[str, typer.Option(help="ci (the quick cases, run by .ci/run) or full (every case; appended to benchmarks/history/).")] = "ci",
    cases: Annotated[Path, typer.Option(help="The cases file; baselines/ and history/ sit beside it.")] = Path("benchmarks/cases.yaml"),
    only: Annotated[list[str], typer.Option(help="Run only this case (repeatable).")] = [],
    update: Annotated[bool, typer.Option("--update", help="Rewrite the suite's baseline with this run's results (deliberately).")] = False,
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Run the regression cases and compare them with the committed baselines; exit 1 when a metric got worse past its tolerance."""
    from squeeze.bench import run_suite

    progress = NullProgress() if quiet else ConsoleProgress(err)

    def announce(index: int, total: int, case) -> None:
        if not quiet:
            err.print(f"[bold]case {index + 1}/{total}[/]: {case.name} ({case.recipe} on {case.model})", highlight=False)

    run = _run(run_suite, cases, suite, tuple(only), update, device, on_case=announce, progress=progress)
    if as_json:
        sys.stdout.write(json.dumps([{"case": o.case, "metrics": o.metrics, "regressed": o.regressed} for o in run.outcomes], indent=2) + "\n")
    else:
        table = Table(title=f"squeeze bench --suite {suite}: against {run.baseline_file}", title_justify="left")
        for name in ("case", "metric", "verdict", "baseline", "new", "change", "limit"):
            table.add_column(name, justify="left" if name in ("case", "metric", "verdict") else "right",
                             no_wrap=name in ("metric", "verdict"), overflow="fold")
        styles = {"REGRESSED": "bold red", "better": "green", "new": "yellow"}
        for outcome in run.outcomes:
            for metric, old, new, limit, verdict in outcome.rows:
                change = "-" if old is None or old == 0 else f"{new / old - 1:+.2%}"
                table.add_row(
                    outcome.case, metric, f"[{styles[verdict]}]{verdict}[/]" if verdict in styles else verdict,
                    _number(old), _number(new), change, "-" if old is None else _number(limit),
                )
        out.print(table)
        out.print(f"reference op: {run.unit_seconds * 1000:.1f} ms; time_ratio = case seconds / reference op seconds")
    if update:
        err.print(f"baseline written: {run.baseline_file}")
        return
    if run.regressed:
        names = sorted({o.case for o in run.outcomes if o.regressed})
        _fail(f"regression in {', '.join(names)}: a metric is worse than its baseline past the tolerance (rerun with --update only if that is intended)", code=1)


@app.command("bench-infer")
def bench_infer(
    model: ModelArg,
    compare: Annotated[list[str], typer.Option(help="A compressed checkpoint of MODEL to measure beside it (repeatable); compressed-tensors W8A8/W4A16/W8A16 run on integer kernels.")] = [],
    prefill_tokens: Annotated[int, typer.Option(help="Prompt tokens of the prefill measurement.")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="Tokens generated one at a time after the prompt.")] = 128,
    repeats: Annotated[int, typer.Option(help="Runs per form; the best is reported.")] = 3,
    prompts: Annotated[int, typer.Option(help="Prompts (64 tokens of --data each) for generation agreement with fp32; 0 skips it.")] = 8,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per agreement prompt.")] = 32,
    no_bf16: Annotated[bool, typer.Option("--no-bf16", help="Leave out MODEL in bfloat16.")] = False,
    reference_kernels: Annotated[bool, typer.Option("--reference-kernels", help="Also run each quantized checkpoint on the dequantize-per-call reference forward.")] = False,
    data: DataOption = "wikipedia",
    device: DeviceOption = "cpu",
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Also write the results as JSON to this file.")] = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Prefill and decode tokens/s, weight memory, peak RSS and greedy-generation agreement of MODEL in fp32 and bf16 and of each --compare checkpoint, side by side in one run (each form in its own process)."""
    from squeeze.speed import Form, bench_infer as run_bench, default_forms

    if out_file is not None and out_file.exists() and not overwrite:
        _fail(f"{out_file} exists; pass --overwrite to replace it")
    forms = _run(default_forms, model, compare, not no_bf16)
    if reference_kernels:
        forms += [Form(f.label + " (reference forward)", f.spec, f.dtype, kernels=False) for f in forms if f.label.startswith("W")]
    progress = err if not quiet else None

    def on_form(result) -> None:
        if progress:
            progress.print(
                f"{result.label}: prefill {result.prefill_tokens_per_s:,.0f} tok/s, decode {result.decode_tokens_per_s:,.1f} tok/s",
                highlight=False,
            )

    result = _run(
        run_bench, model, forms, data=data, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens, repeats=repeats,
        agreement_prompts=prompts, agreement_tokens=new_tokens, device=device, on_form=on_form,
    )
    if out_file is not None:
        out_file.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    elif not quiet:
        out.print(_speed_table(result))


def _speed_table(result) -> Table:
    from squeeze.report import _fmt_bytes

    base = result.forms[0].label
    table = Table(title=f"{result.model}: prefill {result.prefill_tokens} / decode {result.decode_tokens} tokens, {result.machine}")
    for column in ("form", "runs on", "prefill tok/s", "decode tok/s", "weights", "peak RSS", "ROUGE-L", "BLEU"):
        table.add_column(column, justify="left" if column in ("form", "runs on") else "right", overflow="fold")
    for form in result.forms:
        r = result.ratios(form)
        agree = form.agreement or {}
        table.add_row(
            form.label, form.runs_on,
            f"{form.prefill_tokens_per_s:,.0f} ({r['prefill']:.2f}x)", f"{form.decode_tokens_per_s:,.1f} ({r['decode']:.2f}x)",
            f"{_fmt_bytes(form.weight_bytes)} ({r['weights']:.2f}x)", f"{_fmt_bytes(form.peak_rss_bytes)}",
            f"{agree['rougeL']:.3f}" if agree else ("ref" if form.label == base else "-"),
            f"{agree['bleu']:.1f}" if agree else ("ref" if form.label == base else "-"),
        )
    return table


@app.command("eval")
def eval_command(
    model: ModelArg,
    reference: Annotated[Optional[str], typer.Option(help="Compare with this model: KL, top-1 and generation agreement (causal LMs) or embedding cosine (encoders).")] = None,
    data: Annotated[list[str], typer.Option(help="Text source, repeatable: wikipedia, bbc, shakespeare, or a .txt file/folder (default wikipedia).")] = [],
    generation_prompts: Annotated[int, typer.Option(help="Prompts for generation agreement with --reference (greedy, 32 tokens each); 0 skips it.")] = 8,
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    batch_size: BatchSizeOption = 2,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Perplexity per text source and, against --reference, KL, top-1 and generation agreement or embedding cosine: the numbers the pass reports use."""
    from squeeze.api import evaluate_model

    _at_least_one(("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size))
    if generation_prompts < 0:
        _fail(f"--generation-prompts must not be negative, got {generation_prompts}")
    progress = NullProgress() if quiet else ConsoleProgress(err)
    result = _run(
        evaluate_model, model, reference, data or ["wikipedia"], eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size,
        device=device, dtype=dtype, generation_prompts=generation_prompts, trust_remote_code=trust_remote_code, progress=progress,
    )
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    elif not quiet:
        out.print(_eval_table(result))


def _eval_table(result) -> Table:
    title = f"squeeze eval: {result.model}" + (f" against {result.reference}" if result.reference else "") + f" ({result.device})"
    table = Table(title=title)
    encoder = result.kind == "encoder"
    columns = ["data", "tokens"]
    columns += ["cosine mean", "cosine min"] if encoder else ["perplexity"]
    if result.reference and not encoder:
        columns += ["reference perplexity", "change", "KL (nats/token)", "top-1", "ROUGE-L", "BLEU"]
    for column in columns:
        table.add_column(column, justify="left" if column == "data" else "right")
    for row in result.rows:
        cells = [row.data, f"{row.tokens:,}"]
        if encoder:
            cells += [f"{row.embedding_cosine_mean:.5f}", f"{row.embedding_cosine_min:.5f}"]
        else:
            cells.append(f"{row.perplexity_after:.3f}")
        if result.reference and not encoder:
            cells += [
                f"{row.perplexity_before:.3f}", f"{row.perplexity_change:+.2%}", f"{row.kl_divergence:.5f}", f"{100 * row.top1_agreement:.2f}%",
                f"{row.rougeL:.3f}" if row.rougeL is not None else "-", f"{row.bleu:.1f}" if row.bleu is not None else "-",
            ]
        table.add_row(*cells)
    return table


@app.command()
def generate(
    model: ModelArg,
    compare: Annotated[list[str], typer.Option(help="Another model to continue the same prompts with the same sampler and seed (repeatable), e.g. a compressed checkpoint.")] = [],
    prompt: Annotated[Optional[str], typer.Option(help="The prompt.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="A UTF-8 file with one prompt per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt at most (stops early at end of text).")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy (argmax); above 0 divides the logits before sampling.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the K most likely tokens only.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample among the smallest set of most likely tokens whose probability reaches P (nucleus).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler's random stream (prompt i uses seed + i), the same for every model.")] = 0,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the model's chat template (instruction-tuned models).")] = False,
    kernels: Annotated[bool, typer.Option("--kernels", help="Run quantized checkpoints on integer kernels (faster; rounding differs slightly from the pass's evaluation).")] = False,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    as_json: JsonOption = False,
    trust_remote_code: TrustOption = False,
) -> None:
    """Continue prompts with MODEL and each --compare model, side by side: greedy, or temperature then top-k then top-p sampling with one seed for all."""
    from rich.panel import Panel

    from squeeze.api import generate_side_by_side, read_prompts
    from squeeze.sampling import Sampling

    sampling = _run(Sampling, temperature, top_k, top_p)
    texts = _run(read_prompts, prompt, prompts)
    progress = NullProgress() if as_json else ConsoleProgress(err)
    result = _run(
        generate_side_by_side, [model, *compare], texts, sampling, max_new_tokens=max_new_tokens, seed=seed, chat=chat,
        device=device, dtype=dtype, kernels=kernels, trust_remote_code=trust_remote_code, progress=progress,
    )
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        return
    out.print(f"[bold]{sampling.describe()}[/], seed {seed}, at most {max_new_tokens} new tokens", highlight=False)
    for entry in result["prompts"]:
        out.rule(entry["prompt"][:120], style="dim")
        row = Table.grid(expand=True, padding=(0, 1))
        for _ in entry["outputs"]:
            row.add_column(ratio=1)
        row.add_row(*[
            Panel(o["text"], title=spec, subtitle=f"{o['tokens']} tokens, {o['tokens_per_s']:.1f} tok/s", expand=True)
            for spec, o in entry["outputs"].items()
        ])
        out.print(row)


if __name__ == "__main__":
    app()
