"""Folds found in each block, and proven before they are used.

A fold divides the output of a *producer* by per-channel scales ``s`` and multiplies the matching
input columns of the Linear layers that read that output by ``s``: the block computes the same
function, but the readers' inputs and weights change shape (SmoothQuant flattens activations,
AWQ protects salient weight columns). The producer is a norm, or a Linear layer whose output
reaches its readers only through linear operations (attention's value path, a gated MLP's up
branch).

Nothing here knows module names. For each block, :func:`find_folds` runs it once on a
calibration batch and watches its data flow:

- a norm-like module (a 1-D weight as wide as its output) whose output tensor is read directly
  by Linear layers is a candidate, with those layers as its readers;
- a Linear layer P and a later Linear layer C that reads as many channels as P gives out, computed
  inside the block (not a producer's output, not the block's input), are a candidate
  (v_proj → o_proj, up_proj → down_proj, and also pairs that are not folds, like q_proj → o_proj).

Then every candidate is *proven*: the fold is made with random scales of 1/2 and 2 (powers of
two, so an exact fold changes no bit) and the block's output on the batch must stay the same;
otherwise it is undone and reported as skipped with what it changed. A norm is tried with the
plain algebra (``y = x̂ · w + b``: divide ``w`` and ``b``) and then with Gemma's ``y = x̂ · (1 + w)``
(``w ← (1 + w) / s − 1``). A post-norm encoder's norm, whose output is also the residual, fails
both, and so does a pair with a nonlinearity or attention scores between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# how a producer's output is divided by the scales
NORM = "norm"  # y = x̂ · w (+ b): divide w and b
OFFSET_NORM = "offset-norm"  # y = x̂ · (1 + w) (Gemma): w ← (1 + w) / s − 1
LINEAR = "linear"  # y = x Wᵀ + b: divide W's rows and b


@dataclass(frozen=True)
class Fold:
    """A producer inside a block (name relative to the block), the Linear layers that read its
    output, and the algebra that divides that output."""

    prev: str
    linears: tuple[str, ...]
    kind: str

    def describe(self) -> str:
        return f"{self.prev} -> {', '.join(self.linears)}"


@dataclass
class BlockFolds:
    """The proven folds of one block, in the order the block computes their producers, and the
    candidates that failed their proof (fold → why)."""

    folds: list[Fold] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _norm_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, (nn.Linear, nn.Embedding))
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 1
        and not list(module.children())
    )


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], scales: torch.Tensor, kind: str) -> None:
    """Divide ``prev``'s output by ``scales`` (per ``kind``'s algebra) and multiply the matching
    input columns of ``linears``: the block computes the same function."""
    if kind == LINEAR:
        prev.weight.div_(scales.to(prev.weight.device, prev.weight.dtype)[:, None])
    elif kind == OFFSET_NORM:
        weight = prev.weight
        weight.copy_((weight.float() + 1) / scales.to(weight.device) - 1)
    else:
        prev.weight.div_(scales.to(prev.weight.device, prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(scales.to(bias.device, bias.dtype))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight.device, linear.weight.dtype))


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _Trace:
    """One run of a block: producers in call order, and which Linear layers read each one's output."""

    order: list[str] = field(default_factory=list)
    readers: dict[str, list[str]] = field(default_factory=dict)
    # Linear layers whose input is neither a producer's output nor the block's own input: computed
    # inside the block (attention output, act(gate) · up), so possibly reached through a fold
    computed: set[str] = field(default_factory=set)
    output: torch.Tensor | None = None


@torch.no_grad()
def _trace(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> _Trace:
    names = {module: name for name, module in block.named_modules() if name}
    producers = {m: n for m, n in names.items() if _norm_like(m) or isinstance(m, nn.Linear)}
    trace = _Trace()
    made: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # holding every output keeps its id from being reused in the run

    def produced(module: nn.Module, _args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            name = producers[module]
            made[id(output)] = name
            alive.append(output)
            if name not in trace.order:
                trace.order.append(name)

    def read(module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        if id(args[0]) in made:
            readers = trace.readers.setdefault(made[id(args[0])], [])
            if names[module] not in readers:
                readers.append(names[module])
        elif args[0] is not hidden:
            trace.computed.add(names[module])

    handles = [m.register_forward_hook(produced) for m in producers]
    handles += [m.register_forward_pre_hook(read) for m in names if isinstance(m, nn.Linear)]
    try:
        trace.output = _hidden(block(hidden, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
        alive.clear()
    return trace


def _candidates(block: nn.Module, trace: _Trace) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(producer, readers, algebras to try), in the order the block computes the producers."""
    found = []
    linears = [n for n in trace.order if isinstance(block.get_submodule(n), nn.Linear)]
    for prev in trace.order:
        module = block.get_submodule(prev)
        if isinstance(module, nn.Linear):
            later = linears[linears.index(prev) + 1:]
            direct = tuple(trace.readers.get(prev, ()))
            if direct:
                found.append((prev, direct, (LINEAR,)))
            for reader in later:
                if reader in trace.computed and block.get_submodule(reader).in_features == module.out_features:
                    found.append((prev, (reader,), (LINEAR,)))
        elif trace.readers.get(prev):
            readers = tuple(trace.readers[prev])
            if all(block.get_submodule(r).in_features == module.weight.numel() for r in readers):
                found.append((prev, readers, (NORM, OFFSET_NORM)))
    return found


def _tolerance(dtype: torch.dtype) -> float:
    """Relative change of the block's output a fold may make: rounding of the (1 + w) algebra."""
    return 1e-4 if torch.finfo(dtype).bits >= 32 else 2e-2


def _first_row(value: Any, batch: int) -> Any:
    """``value`` (a block argument) cut to the first of ``batch`` rows where it has them."""
    if isinstance(value, torch.Tensor):
        return value[:1] if value.ndim >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_row(v, batch) for v in value)
    return value


@torch.no_grad()
def find_folds(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], seed: int = 0,
    known: dict[tuple, BlockFolds] | None = None,
) -> BlockFolds:
    """The folds of ``block`` proven on one calibration batch (``hidden`` and ``kwargs``: what the
    block receives), its first row when the block runs on that alone (one row of text tells an
    exact fold from another as well as many, at a fraction of the time); see the module
    docstring. The block is unchanged afterwards.

    ``known`` (kept by the caller across blocks) holds the verdicts of earlier blocks with the same
    candidates: then the folds proven there are proven here all at once, with independent scales,
    in one run of the block (candidates refused there are refused here with the same reason), and
    only if that fails is each candidate proven on its own."""
    batch = hidden.shape[0]
    if batch > 1:
        row, row_kwargs = hidden[:1], {k: _first_row(v, batch) for k, v in kwargs.items()}
        try:
            trace = _trace(block, row, row_kwargs)
            hidden, kwargs = row, row_kwargs
        except (RuntimeError, ValueError, IndexError):  # an argument that cannot be cut by rows
            trace = _trace(block, hidden, kwargs)
    else:
        trace = _trace(block, hidden, kwargs)
    reference = trace.output
    assert reference is not None
    proof = _Proof(block, hidden, kwargs, reference, torch.Generator().manual_seed(seed))
    candidates = _candidates(block, trace)
    signature = (type(block).__name__, tuple((prev, readers) for prev, readers, _ in candidates))
    earlier = known.get(signature) if known is not None else None
    if earlier is not None and proof.holds(earlier.folds):
        return BlockFolds(list(earlier.folds), dict(earlier.skipped))
    result = BlockFolds()
    for prev, readers, kinds in candidates:
        kind = next((k for k in kinds if proof.holds([Fold(prev, readers, k)])), None)
        if kind is not None:
            result.folds.append(Fold(prev, readers, kind))
        else:
            result.skipped[f"{prev} -> {', '.join(readers)}"] = f"not exact: scaling {prev}'s output changes the block's output"
    if known is not None:
        known[signature] = result
    return result


class _Proof:
    """Makes folds with random scales of 1/2 and 2, runs the block, and puts every tensor back."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], reference: torch.Tensor, generator: torch.Generator) -> None:
        self.block, self.hidden, self.kwargs, self.generator = block, hidden, kwargs, generator
        self.reference = reference.float()
        self.scale = float(self.reference.norm()) or 1.0
        self.tolerance = _tolerance(reference.dtype)

    def holds(self, folds: list[Fold]) -> bool:
        """Whether the block's output stays the same with all of ``folds`` made at once."""
        if not folds:
            return True
        parts = [(self.block.get_submodule(f.prev), [self.block.get_submodule(r) for r in f.linears], f.kind) for f in folds]
        touched = {id(t): t for producer, linears, _ in parts for t in _touched(producer, linears)}
        saved = {key: t.detach().clone() for key, t in touched.items()}
        try:
            for producer, linears, kind in parts:
                width = linears[0].in_features
                scales = 2.0 ** (torch.randint(0, 2, (width,), generator=self.generator) * 2 - 1).float()
                fold_scales(producer, linears, scales.to(linears[0].weight.device), kind)
            output = _hidden(self.block(self.hidden, **self.kwargs)).float()
        finally:
            for key, tensor in touched.items():
                tensor.copy_(saved[key])
        return float((output - self.reference).norm()) / self.scale <= self.tolerance


def _touched(producer: nn.Module, linears: list[nn.Module]) -> list[torch.Tensor]:
    tensors = [producer.weight]
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        tensors.append(bias)
    return tensors + [m.weight for m in linears]


@dataclass
class FoldTally:
    """Folds made and skipped over a model's blocks, counted by block, for the report's notes."""

    made: dict[str, int] = field(default_factory=dict)
    skipped: dict[tuple[str, str], int] = field(default_factory=dict)
    known: dict[tuple, BlockFolds] = field(default_factory=dict)  # verdicts by block structure (see find_folds)

    def fold(self, fold: Fold) -> None:
        key = f"{fold.describe()} ({fold.kind})"
        self.made[key] = self.made.get(key, 0) + 1

    def skip(self, fold: str, reason: str) -> None:
        self.skipped[(fold, reason)] = self.skipped.get((fold, reason), 0) + 1

    def usable(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], quantized: Callable[[str], bool]) -> list[Fold]:
        """The folds proven in ``block`` (on its inputs ``hidden`` and ``kwargs``) whose readers all
        satisfy ``quantized(name)``; every other candidate is counted as skipped, with why."""
        found = find_folds(block, hidden, kwargs, known=self.known)
        for fold, reason in found.skipped.items():
            self.skip(fold, reason)
        usable = []
        for fold in found.folds:
            if all(quantized(n) for n in fold.linears):
                usable.append(fold)
            else:
                self.skip(fold.describe(), "not every layer reading it is quantized")
        return usable

    def notes(self, method: str) -> list[str]:
        """One line per fold made and per fold skipped, with the number of blocks."""
        lines = [f"{method} folded {fold} in {count} block(s)" for fold, count in self.made.items()]
        lines += [f"{method} skipped the fold {fold} in {count} block(s): {reason}" for (fold, reason), count in self.skipped.items()]
        return lines
