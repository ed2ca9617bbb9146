"""Streamed passes: quantize or prune from disk to disk with one transformer block in memory.

The model is built on the meta device from its config (squeeze.stream.lazy). Everything outside
the blocks (embeddings, final norm, head) is read first, to turn the text into the first block's
inputs, and dropped; then each block in turn is read from the safetensors files, compressed,
handed to the shard writer and dropped; last, the outside is read again, its own planned layers
(if any) are compressed, and it is written too. Calibrating methods get their blocks through the
block source of squeeze.calib.pipeline, so GPTQ, AWQ, SmoothQuant, Wanda and SparseGPT stream
without knowing it; the others are run one part at a time. The tensors written are the resident
pass's, bit for bit.

The evaluation holds no second model either. The reference (the input itself, or a named one) is
streamed over the evaluation windows first and only its last block's hidden states are kept; the
compressed model's states follow the same windows through each block right after it is
compressed; at the end both go through the head (the model's own forward, its blocks stood in
for: squeeze.stream.reference) and are scored as the resident pass scores them. Generation
agreement streams too: the reference, then the written output, continue the prompts together,
each new token reading the model once more one block at a time (squeeze.stream.generation), so
the pass's peak stays one block's whatever the depth. Speed is never measured streamed.

Where the device is a GPU, only the current part and the activations live on it: the model is
onloaded one block at a time.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from squeeze.calib.pipeline import BlockCalls, BlockInputs, capture_block_inputs, streamed_blocks
from squeeze.calib.spill import spilled_calibration
from squeeze.errors import OptionError, literal
from squeeze.evaluate import checkpoint_bytes, parameter_count, tensor_bytes, window_batches
from squeeze.formats import Written, recognise
from squeeze.formats.files import ShardWriter, read_config
from squeeze.generate import agreement, prompts_from_text
from squeeze.models import LoadedModel, ModelSource, load_tokenizer, meta_model, resolve_model
from squeeze.models.load import stored_dtype
from squeeze.passes.common import (
    GENERATION_PROMPT_TOKENS, GENERATION_TOKENS, Prepared, Stopwatch, batches, encoder_batch_size, evaluate_accuracy,
    generation_fields, model_info, reference_name,
)
from squeeze.passes.skeleton import CompressionStep, RunSettings, check_run, process_shares, publish, step_report
from squeeze.progress import NullProgress, Progress
from squeeze.report import Report, SizeReport
from squeeze.sizes import accelerator_memory, default_memory_budget
from squeeze.stream.generation import streamed_greedy_continuations
from squeeze.stream.gguf import GGUFTensors
from squeeze.stream.lazy import CheckpointTensors, LazyModel, return_freed_memory
from squeeze.stream.quantized import quantized_layers
from squeeze.stream.reference import Handover, RecordedReference, recorded_states, stand_in_blocks
from squeeze.weightcache import reuse_dequantized


@dataclass
class StreamedStates:
    """Batches of token ids followed through a model one block at a time: the ids, the hidden
    states (with keyword arguments) the next block receives, and every block's own keyword
    arguments (squeeze.calib.capture)."""

    kind: str
    ids: list[torch.Tensor]
    states: BlockInputs
    calls: BlockCalls
    returns_tuple: bool = False
    done: int = 0  # blocks the states have been through

    @classmethod
    def capture(cls, model: nn.Module, kind: str, batches: list[torch.Tensor]) -> StreamedStates:
        """The first block's inputs for each batch (needs the input side of the outside in memory)."""
        calls = [{"input_ids": i} if kind == "causal" else {"input_ids": i, "attention_mask": torch.ones_like(i)} for i in batches]
        captured = capture_block_inputs(model, calls)
        return cls(kind, batches, captured.first, captured)

    @torch.no_grad()
    def through(self, block: nn.Module) -> None:
        """Move the states on through ``block`` (the next block of the model)."""
        following = self.done + 1 < len(self.calls.kwargs)
        moved = []
        with reuse_dequantized():
            for index, (hidden, kwargs) in enumerate(self.states):
                out = block(hidden, **kwargs)
                self.returns_tuple = isinstance(out, (tuple, list))
                moved.append((out[0] if self.returns_tuple else out, self.calls.kwargs[self.done + 1][index] if following else kwargs))
        self.states = moved
        self.done += 1

    def record(self, head: nn.Module) -> RecordedReference:
        """This model's outputs on the batches: the states through ``head`` (blocks stood in for)."""
        return recorded_states(self.kind, self.ids, [hidden for hidden, _ in self.states], self.returns_tuple, head)


def comparison_batches(windows: torch.Tensor, kind: str, batch_size: int, device: str) -> list[torch.Tensor]:
    """``windows`` batched as the evaluation's comparison asks for them."""
    size = batch_size if kind == "causal" else encoder_batch_size(batch_size)
    return [batch.to(device) for batch in window_batches(windows, size)]


def streamable_source(spec: str, trust_remote_code: bool, quantized: bool = False) -> ModelSource:
    """The model ``spec`` names, if it is a GGUF file (dequantized one tensor at a time) or a folder
    of unquantized safetensors weights (pruned ones in sparse-bitmask layout too: they are decoded
    one weight at a time) of a model with one stack of blocks, or, with ``quantized`` (a model
    only evaluated), a compressed-tensors quantized output (squeeze.stream.quantized); an
    OptionError naming ``stream`` otherwise."""
    source = resolve_model(spec, trust_remote_code=trust_remote_code)
    if source.kind == "seq2seq":
        raise OptionError(f"{{0}} reads one stack of blocks, and {literal(spec)} is an encoder-decoder (two): run without {{0}}", "stream")
    fmt = None if source.is_gguf else recognise(source.path)
    readable = ("sparse-bitmask", "compressed-tensors") if quantized else ("sparse-bitmask",)
    name = fmt.name if fmt is not None else None if source.is_gguf else _quant_method(source.path)
    if name is not None and name not in readable:
        also = ", or a compressed-tensors quantize output" if quantized else ""
        raise OptionError(
            f"{{0}} reads GGUF files and folders of safetensors weights (dense, or a sparse-bitmask prune output{also}), and "
            f"{literal(spec)} is a {literal(name)} checkpoint", "stream",
        )
    return source


def _quant_method(folder: Path) -> str | None:
    """The ``quant_method`` of a folder's quantized weights, for checkpoints squeeze does not read
    itself (GPTQ, bitsandbytes); None for dense weights, a pruned model's sparsity-only
    compressed-tensors config (``--format dense``) included."""
    config = read_config(folder).get("quantization_config")
    if not isinstance(config, dict) or config.get("quant_method") == "compressed-tensors" and not config.get("config_groups"):
        return None
    return str(config.get("quant_method", "quantized"))


def lazy_model(source: ModelSource, dtype: torch.dtype, device: str, model: nn.Module | None = None) -> LazyModel:
    """``source`` (its meta ``model``, when already built) with weights read when their part's turn comes."""
    model = model if model is not None else meta_model(source)
    if source.is_gguf:
        return LazyModel(model, GGUFTensors(source.path, model), dtype, device)
    tensors = CheckpointTensors(source.path)
    quantized_layers(model, tensors, dtype)  # a quantize output's layers, decoded when read
    return LazyModel(model, tensors, dtype, device)


def stream_states(
    lazy: LazyModel, kind: str, batches: list[torch.Tensor], progress: Progress, label: str,
    context: Callable[[], ContextManager[object]] = nullcontext,
) -> StreamedStates:
    """The last block's hidden states of ``lazy``'s model on ``batches``, one block in memory at a
    time; each block runs inside ``context()`` (e.g. autocast)."""
    lazy.materialise_outside("input")
    with context():
        states = StreamedStates.capture(lazy.model, kind, batches)
    lazy.release_outside()
    with progress.task(label, len(lazy.blocks)) as advance:
        for index in range(len(lazy.blocks)):
            block = lazy.block(index)
            with context():
                states.through(block)
            lazy.release(block)
            advance(1)
    return states


class _BlockSource:
    """Hands a streamed pass its blocks (squeeze.calib.pipeline.BlockSource): read from disk,
    shown to the step before it compresses them; after, moved on by the evaluation states,
    written, released. The outside, live at first (its input side), goes before block 0; after the
    last, ``final_side`` of it comes back (see squeeze.stream.lazy.LazyModel.outside; None: none)."""

    def __init__(
        self, lazy: LazyModel, step: CompressionStep, writer: ShardWriter, dtype: torch.dtype, planned: list[str], windows: StreamedStates | None,
        final_side: str | None,
    ) -> None:
        self.lazy, self.step, self.writer, self.dtype, self.windows = lazy, step, writer, dtype, windows
        self.planned, self.final_side = planned, final_side
        self.outside_live = True
        self.other = Stopwatch()  # time spent inside the pass's compress stage on evaluating and writing
        self.held: list[nn.Module] = []

    def own(self, index: int) -> tuple[str, ...]:
        """The planned layers of block ``index``."""
        return tuple(n for n in self.planned if n.startswith(f"{self.lazy.blocks[index]}."))

    def outside(self) -> tuple[str, ...]:
        """The planned layers outside the blocks."""
        return tuple(n for n in self.planned if not n.startswith(f"{self.lazy.prefix}."))

    def _observe(self, names: tuple[str, ...]) -> None:
        self.step.observe_part({n: self.lazy.model.get_submodule(n) for n in names})

    def onload(self, index: int) -> nn.Module:
        if self.outside_live:
            self.lazy.release_outside()
            self.outside_live = False
        block = self.lazy.block(index)
        self.held = list(block.modules())  # the layers the step swaps out are released with the block
        self._observe(self.own(index))
        return block

    def offload(self, index: int, block: nn.Module) -> None:
        # the evaluation's and the writer's share of the time, which the pass books under their own names
        with self.other.stage("evaluate"):
            if self.windows is not None:
                self.windows.through(block)
        with self.other.stage("save"):
            self.writer.add(self.step.part_tensors(block, f"{self.lazy.blocks[index]}.", self.dtype))
            self.writer.end_part()
        self.lazy.release(block, self.held)
        self.held = []
        if index == len(self.lazy.blocks) - 1 and self.final_side is not None:
            self.lazy.materialise_outside(self.final_side)
            self.outside_live = True
            self._observe(self.outside())


def _exact(compute: torch.dtype, stored: torch.dtype) -> bool:
    """Whether a tensor stored in ``stored`` comes back unchanged through ``compute``: then what the
    pass writes of an untouched tensor is the checkpoint's own."""
    return compute == stored or compute == torch.float32 and stored in (torch.float16, torch.bfloat16)


def fits_whole(need: int, memory_budget: int | None, device: str) -> bool:
    """Whether a whole model needing about ``need`` bytes fits the budget (and the GPU's free memory)."""
    budget = memory_budget if memory_budget is not None else default_memory_budget()
    gpu = accelerator_memory(device)
    return (budget is None or need <= budget) and (gpu is None or need <= gpu)


def streamed_continuations(
    source: ModelSource, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int, dtype: torch.dtype, device: str,
    progress: Progress, label: str,
) -> list[str]:
    """Greedy continuations of ``prompts`` [1, n] by the model of ``source``, read one block at a
    time for every new token (squeeze.stream.generation), on a meta model of its own (one that
    states stream through keeps its blocks)."""
    with progress.task(f"greedy continuations of {len(prompts)} prompts, {label}, block by block", max_new_tokens) as advance:
        lazy = lazy_model(source, dtype, device)
        return streamed_greedy_continuations(lazy, tokenizer, prompts, max_new_tokens, tokenizer.eos_token_id, advance)


def streamed_generation_agreement(
    model: ModelSource, reference: ModelSource, tokenizer, data: str, prompts: int, dtype: torch.dtype, device: str,
    watch: Stopwatch, progress: Progress,
) -> dict:
    """Generation agreement (AccuracyReport fields) of ``model`` against ``reference``, neither
    held whole: each continues the prompts from ``data`` block by block (:func:`streamed_continuations`),
    the reference first, then the model."""
    prompt_ids = prompts_from_text(tokenizer, data, prompts, GENERATION_PROMPT_TOKENS)
    with watch.stage("generate"):
        texts = [
            streamed_continuations(source, tokenizer, prompt_ids, GENERATION_TOKENS, dtype, device, progress, label)
            for label, source in (("the reference", reference), (model.name, model))
        ]
    return generation_fields(agreement(*texts))


class _Discarded:
    """The shard writer of a process that only helps calibrate (squeeze.passes.launch): it keeps nothing."""

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def end_part(self) -> None:
        pass

    def close(self) -> list[Path]:
        return []


def stream_pass(
    step: CompressionStep, model: str, out: Path, run: RunSettings, progress: Progress | None = None, writes: bool = True,
) -> Report | None:
    """Run ``step`` on ``model`` into ``out`` one block at a time (see the module docstring);
    the report as :func:`squeeze.passes.skeleton.run_pass` gives it. Without ``writes`` (a
    process that only helps calibrate: squeeze.passes.launch) every block is compressed but
    nothing is kept, and it returns None."""
    step.check(run)
    step.check_stream(run)
    if run.measure_speed:
        raise OptionError("{0} loads the whole model to time it: drop it with {1}", "measure_speed", "stream")
    progress = progress or NullProgress()
    watch = Stopwatch()
    out = Path(out)
    checked = check_run(step, model, out, run, lambda spec: streamable_source(spec, run.trust_remote_code))
    source, net, device, compute, seq_len = checked.source, checked.meta, checked.device, checked.compute_dtype, checked.seq_len
    ref_source, eval_windows, calib_windows = checked.ref_source, checked.eval_windows, checked.calib_windows
    prep_plan = checked.plan
    tokenizer = checked.tokenizer if checked.tokenizer is not None else load_tokenizer(source)
    stored = stored_dtype(source)
    lazy = lazy_model(source, compute, device, net)
    parameters, memory_before, disk_before = parameter_count(net), tensor_bytes(net), checkpoint_bytes(net, stored)
    prep = Prepared(
        source=source, loaded=LoadedModel(net, tokenizer, source, net.config, stored), device=device, plan=prep_plan,
        seq_len=seq_len, eval_windows=eval_windows, calib_windows=calib_windows, reference=None, parameters=parameters,
        memory_before=memory_before, disk_before=disk_before,
        linear_flops=sum(2 * m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear)),
    )
    estimate = step.memory_estimate(net, prep, run, streamed=True)
    label, total = step.start(prep)
    planned = list(prep.plan)
    prep.plan = {}
    del prep_plan

    def assemble(folder: Path) -> Report:
        reference = None
        if eval_windows is not None:
            with watch.stage("evaluate"):
                reference = stream_states(
                    lazy_model(ref_source or source, compute, device), source.kind,
                    comparison_batches(eval_windows, source.kind, run.batch_size, device), progress,
                    f"the {'reference' if ref_source else 'input'}'s outputs on {run.data}, block by block",
                )
        writer = ShardWriter(folder, run.max_shard_size) if writes else _Discarded()
        lazy.materialise_outside("input")
        ours = None
        if eval_windows is not None:
            ours = StreamedStates.capture(net, source.kind, comparison_batches(eval_windows, source.kind, run.batch_size, device))
        # with nothing to compress outside the blocks, their tensors go from the checkpoint to the
        # writer one at a time, and only the head comes back, for the evaluation
        outside_planned = any(not n.startswith(f"{lazy.prefix}.") for n in planned)
        direct = not outside_planned and _exact(compute, stored)
        final_side = "all" if not direct else "output" if ours is not None else None
        blocks = _BlockSource(lazy, step, writer, stored, planned, ours, final_side)
        calibration = list(batches(calib_windows, run.batch_size, device, net)) if calib_windows is not None else None
        spill = spilled_calibration(out.parent) if run.spill_calibration and calibration is not None else nullcontext()
        with watch.stage(step.name), progress.task(label, total) as advance, streamed_blocks(blocks), spill:
            if step.blockwise:
                calibration_s = step.compress(net, calibration, lambda _name: advance(1))
            else:
                for index in range(len(lazy.blocks)):
                    block = blocks.onload(index)
                    step.compress_part(net, blocks.own(index), lambda _name: advance(1))
                    blocks.offload(index, block)
                if blocks.outside():
                    step.compress_part(net, blocks.outside(), lambda _name: advance(1))
                calibration_s = step.finish_parts()
        if calibration is not None:
            watch.timings["calibrate"] = calibration_s
            watch.timings[step.name] -= calibration_s
        for stage, seconds in blocks.other.timings.items():
            watch.timings[step.name] -= seconds
            watch.timings[stage] = watch.timings.get(stage, 0.0) + seconds
        watch.absorb_peak(blocks.other)
        shares = process_shares(calibration, watch)
        del calibration
        with watch.stage("save"), progress.status(f"writing {out}"):
            if direct:
                for name in lazy.outside():
                    kept = lazy.tensors.read([name]) if name in lazy.tensors else {}
                    writer.add({n: t.to(stored) if t.is_floating_point() else t for n, t in kept.items()})
                    writer.end_part()
            else:
                with lazy.without_blocks():
                    writer.add(step.part_tensors(net, "", stored))
            files = writer.close()
            written = Written(files, step.write_config(net, prep, folder))
        memory_after = tensor_bytes(net)
        accuracy = None
        notes = [f"streamed: one block in memory at a time ({lazy.peak_parts} part(s) at most; the parts outside the blocks are one)"]
        if run.spill_calibration and calib_windows is not None:
            notes.append("the calibration activations were kept on disk, one batch in memory at a time")
        if reference is not None and ours is not None:
            head = stand_in_blocks(net, Handover())
            if ref_source is None and not blocks.outside():
                ref_head = head  # the input's outside is the output's: one head serves both
            else:
                ref_lazy = lazy_model(ref_source or source, compute, device)
                ref_lazy.materialise_outside("output")
                ref_head = stand_in_blocks(ref_lazy.model, Handover())
            accuracy = evaluate_accuracy(
                ours.record(head), source.kind, reference.record(ref_head), eval_windows, run.data, seq_len, run.batch_size,
                watch, progress, reference_name(run.reference),
            )
            # the recorded states and the reference's head go before generation reads the models again
            reference = ours = ref_head = ref_lazy = None
            if blocks.outside_live:  # the output's head too: what is left to do reads names and shapes only
                lazy.release_outside()
                blocks.outside_live = False
            return_freed_memory()
            if source.kind == "causal" and run.generation_prompts:
                generation = streamed_generation_agreement(
                    resolve_model(str(folder)), ref_source or source, tokenizer, run.data, run.generation_prompts, compute, device,
                    watch, progress,
                )
                accuracy = dataclasses.replace(accuracy, **generation)
                notes.append("generation agreement: the reference, then the output, one block at a time for every new token")
        parts = step.report(net, prep, written, run, out)
        size = SizeReport(
            parameters=parameters, compressed_parameters=parts.compressed_parameters, disk_bytes_before=disk_before,
            disk_bytes_after=sum(f.stat().st_size for f in files), memory_bytes_before=memory_before, memory_bytes_after=memory_after,
            linear_bytes_before=parts.linear_bytes_before, linear_bytes_after=parts.linear_bytes_after,
        )
        return step_report(
            step, model_info(model, source, net), parts, size, watch, f"{device}, {run.dtype} compute", estimate, accuracy, net,
            settings={"streamed": True, **shares}, notes=notes,
        )

    if not writes:
        with tempfile.TemporaryDirectory(prefix="squeeze-helper-") as scratch:
            assemble(Path(scratch))  # config.json and tokenizer land here and go
        return None
    return publish(out, run.overwrite, assemble, watch, progress)
