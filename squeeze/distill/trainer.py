"""The training loop: student against teacher (live or cached), one or many processes.

Data order is a function of (seed, position): position p of the run reads window
``permutation(epoch = p // n)[p % n]``, so any process can find its windows for any step without
state, a resumed run reads what the uninterrupted one would have, and N processes with batch B
read exactly the windows one process with batch N·B reads. Every loss is a mean over tokens and
every process holds the same number of tokens, so the averaged gradients of N processes equal the
gradient of one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from squeeze.distill.cache import LogitCache
from squeeze.distill.checkpoint import CheckpointDir, TrainingState, load_optimizer, optimizer_tensors, restore_rng
from squeeze.distill.config import DistillConfig
from squeeze.distill.losses import fused_lm_loss, hidden_loss
from squeeze.distill.student import parameter_groups
from squeeze.errors import OptionError, SqueezeError
from squeeze.calib.blocks import block_list
from squeeze.processes import Processes


class WindowOrder:
    """Which training window each position of the run reads: a fresh permutation per epoch."""

    def __init__(self, n_windows: int, seed: int) -> None:
        self.n, self.seed = n_windows, seed
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, position: int) -> int:
        epoch, index = divmod(position, self.n)
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=generator).tolist()}
        return self._perms[epoch][index]

    def take(self, start: int, count: int) -> list[int]:
        return [self[p] for p in range(start, start + count)]


class Distillable(nn.Module):
    """The student plus what trains with it: projections onto the teacher's width for the hidden
    loss when the widths differ. Everything that needs gradients runs inside ``forward``, as DDP
    requires."""

    def __init__(self, student: nn.Module, causal: bool, layer_map: tuple[tuple[int, int], ...], teacher_width: int) -> None:
        super().__init__()
        self.student = student
        self.causal = causal
        self.layer_map = layer_map
        width = student.config.hidden_size
        project = width != teacher_width
        self.projections = nn.ModuleDict(
            {str(s): nn.Linear(width, teacher_width, bias=False) for s, _ in layer_map} if project else {}
        )
        if project and not causal:
            self.projections["pooled"] = nn.Linear(width, teacher_width, bias=False)

    def _project(self, key: str, value: torch.Tensor) -> torch.Tensor:
        return self.projections[key](value) if key in self.projections else value

    def forward(self, input_ids: torch.Tensor) -> dict[str, Any]:
        hidden = bool(self.layer_map)
        if self.causal:
            out = self.student(input_ids=input_ids, output_hidden_states=hidden)
            result: dict[str, Any] = {"logits": out.logits[:, :-1]}
        else:
            out = self.student(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), output_hidden_states=hidden)
            pooled = out.last_hidden_state.float().mean(dim=1)
            result = {"pooled": self._project("pooled", pooled)}
        if hidden:
            result["hidden"] = [self._project(str(s), out.hidden_states[s + 1]) for s, _ in self.layer_map]
        return result


@dataclass
class TrainInputs:
    """Everything the loop reads; built and validated by the API before any training starts."""

    model: Distillable
    teacher: nn.Module | None  # None when the cache supplies the logits and no hidden loss needs the teacher
    windows: torch.Tensor  # [n, seq_len] training windows (CPU)
    config: DistillConfig
    processes: Processes
    device: str
    checkpoints: CheckpointDir | None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name in the student → keep mask
    cache: LogitCache | None = None
    resume: bool = False  # continue from the newest checkpoint in ``checkpoints``, if there is one
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # held-out metrics for --eval-every


def autocast_for(device: str, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast when asked for, or with ``auto`` where the device has fast bf16 (CUDA)."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if precision == "bf16" or (precision == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported()):
        return lambda: torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(inputs: TrainInputs, state: TrainingState, on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainingState:
    """Run optimizer steps ``state.step`` .. ``config.steps``; returns the final state."""
    cfg, procs, device = inputs.config, inputs.processes, inputs.device
    model = inputs.model
    model.train()
    if inputs.teacher is not None:
        inputs.teacher.eval()
    trained: nn.Module = model
    if cfg.fsdp:
        _shard(model)
    elif procs.world > 1:
        trained = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[procs.local_rank] if device.startswith("cuda") else None,
            find_unused_parameters=not model.causal,  # an encoder's pooler takes no part in the embedding loss
        )
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    torch.manual_seed(cfg.seed * 1_000_003 + procs.rank)  # dropout; identical data order needs no RNG
    state = _resume(inputs, optimizer, state)
    params = dict(model.student.named_parameters())
    masks = {name: _like(params[name], mask.to(device=device, dtype=params[name].dtype)) for name, mask in inputs.masks.items()}
    order = WindowOrder(inputs.windows.shape[0], cfg.seed)
    global_batch = cfg.batch_size * procs.world
    autocast = autocast_for(device, cfg.precision)
    tokens_per_step = global_batch * cfg.grad_accum * inputs.windows.shape[1]
    while state.step < cfg.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(state.step)
        terms_sum: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            position = (state.step * cfg.grad_accum + micro) * global_batch + procs.rank * cfg.batch_size
            window_ids = order.take(position, cfg.batch_size)
            ids = inputs.windows[window_ids].to(device)
            sync = micro == cfg.grad_accum - 1 or procs.world == 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            with (contextlib.nullcontext() if sync or cfg.fsdp else trained.no_sync()):
                with autocast():
                    loss, terms = _loss(trained, inputs, ids, window_ids)
                (loss / cfg.grad_accum).backward()
            for key, value in terms.items():
                terms_sum[key] = terms_sum.get(key, 0.0) + value / cfg.grad_accum
        for name, mask in masks.items():
            if params[name].grad is not None:
                params[name].grad.mul_(mask)
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask)
        keys = sorted(terms_sum)
        means = dict(zip(keys, procs.mean([terms_sum[k] for k in keys])))
        state.step += 1
        state.tokens += tokens_per_step
        state.train_seconds += time.perf_counter() - started
        entry = {"step": state.step, "tokens": state.tokens, "lr": cfg.lr_at(state.step - 1), "grad_norm": grad_norm, **means}
        if inputs.evaluate is not None and cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            if procs.main or cfg.fsdp:  # a sharded student's forward needs every process
                model.eval()
                entry.update(inputs.evaluate(model.student))
                model.train()
            procs.barrier()
        state.curve.append(entry)
        if on_step is not None:
            on_step(state.step, entry)
        if inputs.checkpoints is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
            save_checkpoint(inputs.checkpoints, model, optimizer, state, procs, cfg.keep_checkpoints, cfg.fsdp)
    model.eval()
    return state


def _loss(trained: nn.Module, inputs: TrainInputs, ids: torch.Tensor, window_ids: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = inputs.config
    model = inputs.model
    out = trained(ids)
    teacher = _teacher_outputs(inputs, ids, window_ids)
    if model.causal:
        loss, lm_terms = fused_lm_loss(
            out["logits"], ids[:, 1:] if cfg.alpha < 1 else None, cfg.temperature, cfg.alpha,
            teacher_logits=teacher.get("logits"), teacher_logprobs=teacher.get("topk_logprobs"),
            teacher_indices=teacher.get("topk_indices"), teacher_sampled=inputs.cache.samples if inputs.cache else 0,
        )
        values = dict(lm_terms)
    else:
        loss = hidden_loss(out["pooled"], teacher["pooled"], cfg.embedding_loss)
        values = {"embedding": float(loss.detach())}
    if model.layer_map:
        pairs = zip(out["hidden"], teacher["hidden"])
        hidden = sum(hidden_loss(s, t, cfg.hidden_loss or "cosine") for s, t in pairs) / len(model.layer_map)
        values["hidden"] = float(hidden.detach())
        loss = loss + cfg.hidden_weight * hidden
    values["loss"] = float(loss.detach())
    return loss, values


@torch.no_grad()
def _teacher_outputs(inputs: TrainInputs, ids: torch.Tensor, window_ids: list[int]) -> dict[str, Any]:
    cfg, model = inputs.config, inputs.model
    result: dict[str, Any] = {}
    wants_logits = model.causal and cfg.alpha > 0
    if wants_logits and inputs.cache is not None:
        values, indices = inputs.cache.fetch(window_ids)
        result["topk_logprobs"], result["topk_indices"] = values.to(ids.device), indices.to(ids.device)
        wants_logits = False
    if not (wants_logits or model.layer_map or not model.causal):
        return result
    teacher = inputs.teacher
    assert teacher is not None
    hidden = bool(model.layer_map)
    if model.causal:
        out = teacher(input_ids=ids, output_hidden_states=hidden)
        if wants_logits:
            result["logits"] = out.logits[:, :-1]
    else:
        out = teacher(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=hidden)
        result["pooled"] = out.last_hidden_state.float().mean(dim=1)
    if hidden:
        result["hidden"] = [out.hidden_states[t + 1] for _, t in model.layer_map]
    return result


def save_checkpoint(
    checkpoints: CheckpointDir, model: Distillable, optimizer: torch.optim.Optimizer, state: TrainingState, procs: Processes,
    keep: int, sharded: bool = False,
) -> None:
    """Every process writes its RNG state into the staging folder; the main process writes the
    rest and publishes it. A sharded model is gathered first (every process takes part)."""
    weights = opt_tensors = opt_meta = None
    if sharded:
        weights, opt_tensors, opt_meta = _gather_sharded(model, optimizer)
    elif procs.main:
        weights = _state_dict(model)
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tmp_name = [str(checkpoints.staging(state.step)) if procs.main else ""]
    if procs.world > 1:
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = Path(tmp_name[0])
    checkpoints.write_rng(tmp, procs.rank)
    procs.barrier()
    if procs.main:
        assert weights is not None and opt_tensors is not None and opt_meta is not None
        checkpoints.write_shared(tmp, weights, opt_tensors, opt_meta, state)
        checkpoints.publish(tmp, state.step, keep)
    procs.barrier()


# ---------------------------------------------------------------------------------------------
# FSDP: the student's parameters, gradients and AdamW moments sharded over the processes. These
# helpers import torch.distributed.fsdp, .tensor and .checkpoint where they are used: only --fsdp
# runs need them, and they are slow to import.


def _shard(model: Distillable) -> None:
    """fully_shard each transformer block, then the rest (embeddings, head, projections) as one unit."""
    from torch.distributed.fsdp import fully_shard

    for block in block_list(model.student)[1]:
        fully_shard(block)
    fully_shard(model)


def _like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` laid out like ``param``: sharded the same way when ``param`` is an FSDP shard."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor, param.device_mesh, param.placements)
    return tensor


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def _gather_sharded(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """Full weights and optimizer state of a sharded model on the main process (empty elsewhere);
    optimizer tensors keyed ``"<parameter name>.<state name>"``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    tensors = {f"{fqn}.{name}": value for fqn, entries in full.get("state", {}).items() for name, value in entries.items()}
    return weights, tensors, {"param_groups": full.get("param_groups", []), "keyed_by": "name"}


def _load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, opt_tensors: dict, opt_meta: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if opt_meta.get("keyed_by") != "name":
        raise OptionError("this checkpoint was written without {0}; resume it without {0}", "fsdp")
    set_model_state_dict(model, weights, options=_full_options())
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        fqn, _, name = key.rpartition(".")
        state.setdefault(fqn, {})[name] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": opt_meta["param_groups"]}, options=_full_options())


def final_student(model: Distillable, sharded: bool, main: bool) -> nn.Module | None:
    """The trained student as an ordinary module: itself, or (FSDP) gathered into a fresh copy on
    the main process (every process must call this; the others get None)."""
    if not sharded:
        return model.student if main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if not main:
        return None
    student_state = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    config = copy.deepcopy(model.student.config)
    fresh = type(model.student)(config)
    missing, unexpected = fresh.load_state_dict(student_state, strict=False)
    fresh.tie_weights()
    if unexpected or [k for k in missing if k in dict(fresh.named_parameters())]:
        raise RuntimeError(f"gathered student state does not fit its class: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return fresh.eval()


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Distinct tensors only: a tied head is stored once, as safetensors requires."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _resume(inputs: TrainInputs, optimizer: torch.optim.Optimizer, state: TrainingState) -> TrainingState:
    if inputs.checkpoints is None or not inputs.resume:
        return state
    found = inputs.checkpoints.load_latest(inputs.processes.rank)  # the newest whole one; damaged ones noted
    if found is None:
        return state
    latest, (weights, opt_tensors, opt_meta, rng, loaded) = found
    if inputs.config.fsdp:
        _load_sharded(inputs.model, optimizer, weights, opt_tensors, opt_meta)
        restore_rng(rng)
        return loaded
    if opt_meta.get("keyed_by") == "name":
        raise OptionError("this checkpoint was written with {0}; resume it with {0}", "fsdp")
    misfit = SqueezeError(f"checkpoint {latest} does not fit this student")
    try:
        missing, unexpected = inputs.model.load_state_dict(weights, strict=False)
    except RuntimeError:  # a tensor of another shape
        raise misfit from None
    distinct = set(_state_dict(inputs.model))
    if [k for k in missing if k in distinct] or unexpected:
        raise misfit
    load_optimizer(optimizer, opt_tensors, opt_meta)
    restore_rng(rng)
    return loaded

