"""``squeeze bench-infer`` (speed), ``eval`` (accuracy) and ``generate`` (text side by side)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from squeeze.cli.app import (
    BatchSizeOption, DataOption, DeviceOption, EvalTokensOption, GenerationPromptsOption, JsonOption, MemoryBudgetOption, ModelArg,
    OverwriteOption, QuietOption, SeqLenOption, TrustOption, app, at_least_one, call, err, fail, not_negative, out,
)
from squeeze.passes.common import GENERATION_PROMPTS
from squeeze.passes.evaluate import evaluate_model
from squeeze.passes.generate import generate_side_by_side, read_prompts
from squeeze.progress import ConsoleProgress, NullProgress
from squeeze.report import _fmt_bytes
from squeeze.sampling import Sampling
from squeeze.runtime import Form, bench_infer as run_bench, default_forms


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
    if out_file is not None and out_file.exists() and not overwrite:
        fail(f"{out_file} exists; pass --overwrite to replace it")
    forms = call(default_forms, model, compare, not no_bf16)
    if reference_kernels:
        forms += [Form(f.label + " (reference forward)", f.spec, f.dtype, kernels=False) for f in forms if f.label.startswith("W")]
    progress = err if not quiet else None

    def on_form(result) -> None:
        if progress:
            progress.print(
                f"{result.label}: prefill {result.prefill_tokens_per_s:,.0f} tok/s, decode {result.decode_tokens_per_s:,.1f} tok/s",
                highlight=False,
            )

    result = call(
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
    generation_prompts: GenerationPromptsOption = GENERATION_PROMPTS,
    eval_tokens: EvalTokensOption = 16384,
    seq_len: SeqLenOption = 512,
    batch_size: BatchSizeOption = 2,
    device: DeviceOption = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    trust_remote_code: TrustOption = False,
    stream: Annotated[bool, typer.Option("--stream", help="Hold one transformer block of one model in memory at a time, read from its files (safetensors, GGUF, sparse-bitmask or compressed-tensors quantize outputs): the same scores (generation agreement reads each model once more for every new token). Chosen by itself when the models held whole would not fit --memory-budget.")] = False,
    memory_budget: MemoryBudgetOption = None,
) -> None:
    """Perplexity per text source and, against --reference, KL, top-1 and generation agreement or embedding cosine: the numbers the pass reports use."""
    at_least_one(("--eval-tokens", eval_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size))
    not_negative(("--generation-prompts", generation_prompts))
    progress = NullProgress() if quiet else ConsoleProgress(err)
    result = call(
        evaluate_model, model, reference, data or ["wikipedia"], eval_tokens=eval_tokens, seq_len=seq_len, batch_size=batch_size,
        device=device, dtype=dtype, generation_prompts=generation_prompts, trust_remote_code=trust_remote_code, progress=progress,
        stream=stream, memory_budget=memory_budget,
    )
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    elif not quiet:
        out.print(_eval_table(result))


def _eval_table(result) -> Table:
    title = f"squeeze eval: {result.model}" + (f" against {result.reference}" if result.reference else "") + f" ({result.device})"
    table = Table(title=title, caption="; ".join(result.notes) or None)
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
    sampling = call(Sampling, temperature, top_k, top_p)
    texts = call(read_prompts, prompt, prompts)
    progress = NullProgress() if as_json else ConsoleProgress(err)
    result = call(
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
