"""The distill pass: check everything cheap, load teacher and student, train, evaluate, write."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from squeeze.data import check_source, evaluation_windows, training_windows
from squeeze.device import resolve_device, resolve_dtype
from squeeze.distill import cache as logit_cache
from squeeze.distill.checkpoint import CheckpointDir, TrainingState, default_checkpoint_dir
from squeeze.distill.config import DistillConfig
from squeeze.distill.student import (
    check_layer_map, check_same_vocabulary, check_vocab_sizes, default_layer_map, derive_student, parse_student, pruning_masks,
    resolve_layers, teacher_depth,
)
from squeeze.distill.trainer import (
    Distillable, TrainInputs, WindowOrder, autocast_for, final_student, train,
)
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.evaluate import compare_causal, compare_encoder, parameter_count
from squeeze.formats.files import MAX_SHARD_BYTES
from squeeze.generate import prompts_from_text
from squeeze.models import atomic_output_dir, check_output_dir, is_sparse_folder, load_model, meta_model, resolve_model
from squeeze.models.output import local_inputs
from squeeze.processes import start_processes, stop_processes
from squeeze.passes.common import (
    GENERATION_PROMPT_TOKENS, GENERATION_PROMPTS, GENERATION_TOKENS, Stopwatch, check_speed_kind, eval_seq_len, evaluate_accuracy,
)
from squeeze.passes.stream import comparison_batches, streamable_source
from squeeze.passes.stream_teacher import StreamedTeacher
from squeeze.passes.student_writer import Distilled, write_student
from squeeze.progress import NullProgress, Progress
from squeeze.report import Report
from squeeze.sizes import parse_size

PERIODIC_EVAL_WINDOWS = 8  # held-out windows scored at each eval_every check; the final evaluation uses all


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
    max_shard_size: int | str = MAX_SHARD_BYTES,
    stream_teacher: bool = False,
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
    and returns the report (the others return None). ``max_shard_size`` (bytes, or a size such as
    "5GB") bounds each safetensors file written. ``stream_teacher`` never holds the teacher whole:
    it is read one block at a time to build ``teacher_cache`` and for the evaluation
    (squeeze.passes.stream_teacher); a causal teacher with a cache only.
    """
    progress = progress or NullProgress()
    watch = Stopwatch()
    out = Path(out)
    max_shard_bytes = parse_size(max_shard_size, "max_shard_size")
    check_output_dir(out, overwrite, local_inputs(teacher, student))
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
    if stream_teacher:
        if teacher_cache is None:
            raise OptionError("{0} trains from the teacher's logits cached block by block: add {1} DIR", "stream_teacher", "teacher_cache")
        if measure_speed:
            raise OptionError("{0} loads the teacher whole to time it: drop it with {1}", "measure_speed", "stream_teacher")
        streamable_source(teacher, trust_remote_code)
    check_source(data)
    if evaluate:
        check_source(eval_data or data)
    if measure_speed:
        check_speed_kind("causal" if causal else "encoder")
    checkpoints = CheckpointDir(Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out))
    if checkpoints.path.exists() and not checkpoints.path.is_dir():
        raise SqueezeError(f"checkpoint folder {checkpoints.path} exists and is a file")
    if resume and checkpoints.read_run() is None:
        raise SqueezeError(f"nothing to resume: {checkpoints.path} holds no checkpoints of a distillation run")
    if not resume and checkpoints.holds_run() and not overwrite:
        raise OptionError(
            f"{literal(checkpoints.path)} holds checkpoints of an earlier run: pass {{0}} to continue it, or {{1}} to start over",
            "resume", "overwrite",
        )

    procs, device = start_processes(device)
    if not procs.main:
        progress = NullProgress()
    try:
        if config.fsdp and procs.world < 2:
            raise OptionError("{0} shards the student over processes: start it with torchrun --nproc-per-node 2 (or more)", "fsdp")
        streamed = None
        with watch.stage("load"), progress.status(f"loading {t_source.name}"):
            if stream_teacher:
                streamed = StreamedTeacher(t_source, compute_dtype, device)
                t_loaded = streamed.loaded
            else:
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
                net = streamed.student(spec, config.seed) if streamed else derive_student(t_loaded.model, spec, config.seed)
        net.requires_grad_(True)
        tokenizer = t_loaded.tokenizer
        seq_len = eval_seq_len(t_loaded.config, seq_len)
        windows = training_windows(tokenizer, data, seq_len, progress=progress)
        global_batch = config.batch_size * procs.world
        if windows.shape[0] < global_batch:
            raise OptionError(
                f"training text {literal(repr(data))} gives {windows.shape[0]} window(s) of {seq_len} tokens, fewer than one batch "
                f"({global_batch}); use more text, a smaller {{0}} or a shorter {{1}}",
                "batch_size", "seq_len",
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
                        source = streamed.cache_teacher(windows, config.batch_size, NullProgress(), autocast) if streamed else t_loaded.model
                        logit_cache.build_cache(source, windows, needed, identity, tmp, config.batch_size, autocast, on_batch=advance)
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
        notes: list[str] = ["the teacher was streamed: read one block at a time, never whole"] if streamed else []
        notes += checkpoints.notes
        if eval_windows is not None:
            reference = t_loaded.model
            if streamed:
                with watch.stage("evaluate"):
                    batches = comparison_batches(eval_windows, "causal", config.batch_size, device)
                    reference = streamed.outputs(batches, progress, f"the teacher's outputs on {eval_data or data}, block by block")
                if generation_prompts:
                    prompts = prompts_from_text(t_loaded.tokenizer, eval_data or data, generation_prompts, GENERATION_PROMPT_TOKENS)
                    with watch.stage("generate"):
                        reference.generation = streamed.continuations(prompts, GENERATION_TOKENS, progress)
            accuracy = evaluate_accuracy(
                net, t_source.kind, reference, eval_windows, eval_data or data, seq_len, config.batch_size, watch, progress,
                None, t_loaded.tokenizer, generation_prompts,
            )
        done = Distilled(
            teacher_spec=teacher, student_spec=student, spec=spec, teacher=t_loaded, student=net, student_parameters=student_params,
            config=config, layer_map=layer_map, masks=masks, sparse_format=input_sparse_format, state=state,
            resumed_from=resumed_from, processes=procs.world, data=data, eval_data=eval_data or data,
            training_windows=windows.shape[0], seq_len=seq_len, teacher_cache=teacher_cache, accuracy=accuracy, device=device,
            dtype=dtype, notes=notes,
        )
        report = write_student(out, overwrite, done, watch, progress, measure_speed, max_shard_bytes)
        checkpoints.clear()
        procs.barrier()
        return report
    finally:
        stop_processes(procs)
