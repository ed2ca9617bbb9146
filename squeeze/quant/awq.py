"""AWQ: activation-aware weight quantization (Lin et al., 2023) for weight-only low-bit schemes.

A few input channels of each Linear layer carry much larger activations than the rest, and the
rounding error of the weights in those columns dominates the layer's output error. AWQ multiplies
those columns by ``s_j > 1`` before round-to-nearest (they lose less to rounding relative to their
size) and divides the layer's input by ``s`` where it is made: in the norm before it, or in the
rows of the Linear layer that produces it. The fold leaves the model's function unchanged; only the
rounding moves. Per fold, ``s = mean|X|^r / mean|Ŵ|^(1−r)`` (``Ŵ``: |W| relative to its
quantization group's maximum) and the ratio ``r`` is searched on a grid, keeping the one with the
smallest output error ``‖X Wᵀ − X (Q(W·s)/s)ᵀ‖²``. ``r = 0`` is ``s = 1``, plain round-to-nearest,
so AWQ never does worse than RTN on the calibration rows. Then each group of weights may be clipped
to a smaller range when that lowers its own output error.

The kernels work on plain tensors; :mod:`squeeze.quant.methods.awq` applies them to the folds
:mod:`squeeze.calib.folds` finds and proves in each block.
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.calib.parallel import calibration_processes, gather_rows
from squeeze.calib.pipeline import CalibrationClock, run_block_observed
from squeeze.quant.rtn import fake_quantize
from squeeze.quant.scheme import QuantArgs

# Calibration rows (tokens) the searches look at per layer input: the error of every candidate is
# computed from the Gram matrix XᵀX, so more rows cost only when the Gram matrix is built.
MAX_ROWS = 4096

# attention scores multiply the errors of q and k together, so clipping them (judged by their own
# output error) tends to hurt
UNCLIPPED = ("q_proj", "k_proj", "query", "key")


def subsample_rows(x: torch.Tensor, max_rows: int = MAX_ROWS, seed: int = 0) -> torch.Tensor:
    """At most ``max_rows`` rows of ``x`` [..., in] as float32 [n, in], picked with a fixed generator."""
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] > max_rows:
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
        x = x[keep.to(x.device)]
    return x.float()


def _group_size(args: QuantArgs, in_features: int) -> int:
    """Columns that share one weight scale: the group, or the whole row for per-channel scales."""
    if args.strategy == "group":
        assert args.group_size is not None
        return args.group_size
    if args.strategy == "channel":
        return in_features
    raise ValueError(f"AWQ clipping needs per-group or per-channel weight scales, not per-{args.strategy}")


def _relative_magnitude(weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """|W| divided by the largest |W| of its quantization slice, [out, in] in 0..1."""
    magnitude = weight.abs()
    if args.strategy == "tensor":
        return magnitude / magnitude.max().clamp_min(1e-12)
    grouped = magnitude.unflatten(-1, (-1, _group_size(args, weight.shape[-1])))
    return (grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-12)).flatten(-2)


def _output_error(x: torch.Tensor, gram: torch.Tensor | None, delta: torch.Tensor) -> float:
    """``‖x deltaᵀ‖²``, through the Gram matrix ``xᵀx`` when that is cheaper."""
    if gram is None:
        return float((x @ delta.T).square().sum())
    return float(((delta @ gram) * delta).sum())


@torch.no_grad()
def awq_scale_search(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    args: QuantArgs,
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scales that minimise the output error of round-to-nearest.

    ``x`` [n, in] are the inputs the ``weights`` (each [out_i, in]) share. For each ratio
    ``r`` in ``1/n_grid … (n_grid−1)/n_grid`` the candidate is ``s = mean|x|^r / mean|Ŵ|^(1−r)``
    (``x``'s term alone without ``duo_scaling``), clamped to ≥ 1e-4 and divided by
    ``sqrt(max(s)·min(s))``; ``r = 0`` is ``s = 1``. Error: ``Σ ‖x Wᵀ − x (Q(W·s)/s)ᵀ‖²`` over the
    weights. Returns (scales [in] float32, that error, the ratio); ties keep the smaller ratio.
    """
    x = subsample_rows(x)
    weights = [w.detach().float() for w in weights]
    gram = x.T @ x if x.shape[0] > x.shape[1] else None

    def error(scales: torch.Tensor) -> float:
        return sum(_output_error(x, gram, w - fake_quantize(w * scales, args) / scales) for w in weights)

    x_mean = x.abs().mean(dim=0)
    w_mean = _relative_magnitude(torch.cat(weights), args).mean(dim=0).clamp(min=1e-4)
    best_scales = torch.ones_like(x_mean)
    best_error, best_ratio = error(best_scales), 0.0
    for step in range(1, n_grid):
        ratio = step / n_grid
        scales = x_mean.pow(ratio)
        if duo_scaling:
            scales = scales / w_mean.pow(1 - ratio)
        scales = scales.clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        candidate = error(scales)
        if candidate < best_error:
            best_scales, best_error, best_ratio = scales, candidate, ratio
    return best_scales, best_error, best_ratio


def apply_clip(weight: torch.Tensor, clip_values: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``weight`` [out, in] clamped to ±``clip_values`` [out, in // group_size] (whole rows when None)."""
    grouped = weight.unflatten(-1, (-1, group_size or weight.shape[-1]))
    limit = clip_values.to(weight.dtype).unsqueeze(-1)
    return torch.maximum(torch.minimum(grouped, limit), -limit).flatten(-2)


@torch.no_grad()
def awq_clip_search(
    x: torch.Tensor,
    weight: torch.Tensor,
    args: QuantArgs,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per output row and quantization group, the clip value that minimises that group's output error.

    Candidates are ``max|W_group| · (1 − k/n_grid)`` down to ``1 − max_shrink``; the error of a group
    is ``‖x_group (W_group − Q(clip(W))_group)ᵀ‖²`` over the rows of ``x`` [n, in]. Groups are
    quantized independently, so choosing each group's clip on its own is optimal for the layer.
    Returns [out, in // group_size] (one column for per-channel scales), float32.
    """
    x = subsample_rows(x)
    weight = weight.detach().float()
    group_size = _group_size(args, weight.shape[-1])
    x_grouped = x.unflatten(-1, (-1, group_size))
    gram = torch.einsum("ngk,ngl->gkl", x_grouped, x_grouped)
    max_abs = weight.unflatten(-1, (-1, group_size)).abs().amax(dim=-1)
    best_clip = max_abs
    best_error = torch.full_like(max_abs, float("inf"))
    for step in range(round(max_shrink * n_grid) + 1):
        clip_values = max_abs * (1 - step / n_grid)
        delta = (weight - fake_quantize(apply_clip(weight, clip_values, group_size), args)).unflatten(-1, (-1, group_size))
        error = (torch.einsum("ogk,gkl->ogl", delta, gram) * delta).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_clip = torch.where(better, clip_values, best_clip)
    return best_clip


@torch.no_grad()
def capture_inputs(
    block: nn.Module,
    inputs: list,
    modules: dict[str, nn.Module],
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    clock: CalibrationClock | None = None,
) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` input rows (tokens) of each module over one pass of ``block`` on ``inputs``.

    Modules that read the very same tensor (q/k/v, gate/up) get the same captured tensor object,
    so transforming it once transforms it for all of them. Rows are float32 [n, in].

    Under data-parallel calibration (squeeze.calib.parallel) each process samples its own calls'
    rows with the generator state one process would have reached at them, and the rows are
    gathered in call order: every process captures what one process would.
    """
    # the token count of every call of every process, in the one-process order
    procs = calibration_processes()
    shares = procs.gather_objects([h.shape[:-1].numel() for h, _ in inputs])
    counts = [count for share in shares for count in share]
    own_first = sum(len(share) for share in shares[: procs.rank])
    rows_per_call = -(-max_rows // max(len(counts), 1))
    generator = torch.Generator().manual_seed(seed)
    chunks: dict[str, list[torch.Tensor]] = {}
    alias: dict[str, str] = {}
    # holding the tensor keeps its memory from being reused for another input within the call
    first_reader: dict[tuple, tuple[str, torch.Tensor]] = {}
    # a process whose share starts later holds its first call's rows until it knows how many draws
    # (one per module reading a distinct tensor) each earlier call made from the generator
    deferred: list[tuple[str, torch.Tensor]] | None = [] if own_first else None

    def draw(name: str, rows: torch.Tensor) -> None:
        keep = torch.randperm(rows.shape[0], generator=generator)[:rows_per_call]
        chunks.setdefault(name, []).append(rows[keep.to(rows.device)].float())

    def catch_up() -> None:
        nonlocal deferred
        if deferred:
            for count in counts[:own_first]:
                for _ in deferred:
                    torch.randperm(count, generator=generator)
            for name, rows in deferred:
                draw(name, rows)
            deferred = None

    def observe(name: str, _module: nn.Module, x: torch.Tensor) -> None:
        x = x.detach()
        key = (x.data_ptr(), tuple(x.shape))
        if key in first_reader:
            alias[name] = first_reader[key][0]
            return
        first_reader[key] = (name, x)
        rows = x.reshape(-1, x.shape[-1])
        if deferred is not None:
            deferred.append((name, rows))
        else:
            draw(name, rows)

    def before_call() -> None:
        first_reader.clear()
        catch_up()

    try:
        run_block_observed(block, inputs, modules, observe, before_call=before_call, clock=clock)
        catch_up()
    finally:
        first_reader.clear()
    merged = {n: gather_rows(torch.cat(chunks[n])) for n in sorted(chunks)}
    captured = {n: subsample_rows(merged[n], max_rows, seed) for n in chunks}
    captured.update({n: captured[source] for n, source in alias.items() if n not in captured})
    return captured
