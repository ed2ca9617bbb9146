"""Every weight matrix as an ``nn.Linear`` layer, and back to the layout its checkpoint stores.

squeeze's methods, targets and formats work on ``nn.Linear`` layers (weight [out, in]). Two kinds
of weight matrix in transformers are not Linear layers:

- GPT-2 and its relatives compute with ``Conv1D``: the same product, with the weight stored
  transposed ([in, out]). A model's ``Conv1D`` layers become :class:`TransposedLinear` layers as
  soon as it is built (loaded, or on the meta device for checks): Linear layers that remember the
  checkpoint's layout. Dense tensors written back (:func:`stored_tensor`) go out as the
  checkpoint had them, so the output loads in transformers as the original did; quantized layers
  are written in the Linear layout that the GPTQ and bitsandbytes loaders use for ``Conv1D`` too.
- Mixture-of-experts models in transformers 5 hold their experts fused, as 3-D parameters
  (``gate_up_proj`` [experts, 2 · intermediate, hidden], ``down_proj`` [experts, hidden,
  intermediate]). They become :class:`ExpertLinears`: one gate, up and down Linear layer per
  expert, named as the model's original checkpoints name them (Mixtral's ``w1``/``w3``/``w2``,
  Qwen-MoE's ``gate_proj``/``up_proj``/``down_proj``), which is the per-expert layout
  transformers converts back to fused on loading and vLLM reads. Every method then quantizes and
  prunes each expert on its own. During calibration (:func:`all_experts_calibrating`) every
  expert also sees every token, for its statistics, while the block's output keeps the real
  routing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.pytorch_utils import Conv1D

from squeeze.errors import SqueezeError

# the names of one expert's gate, up and down projections when a model's conversion mapping does not say
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")

_ALL_EXPERTS: ContextVar[bool] = ContextVar("all_experts", default=False)


class TransposedLinear(nn.Linear):
    """A ``Conv1D`` as a Linear layer: weight held [out, in], stored [in, out] in the checkpoint."""

    stored_transposed = True


def _linear_for(conv: Conv1D) -> TransposedLinear:
    in_features, out_features = conv.weight.shape
    with torch.device("meta"):
        linear = TransposedLinear(in_features, out_features, bias=conv.bias is not None)
    weight = conv.weight
    linear.weight = nn.Parameter(weight.detach().T.contiguous() if not weight.is_meta else weight.new_empty(out_features, in_features), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


class _Expert(nn.Module):
    """One expert: ``down(act(gate(x)) · up(x))``, its projections Linear layers."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act: nn.Module) -> None:
        super().__init__()
        self._names, self._act = names, [act]  # in a list: the activation is not a submodule
        with torch.device("meta"):
            for name, (n_in, n_out) in zip(names, ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))):
                self.add_module(name, nn.Linear(n_in, n_out, bias=False))

    def forward(self, x: torch.Tensor, hooks: bool = True) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self._names)
        call = (lambda m, v: m(v)) if hooks else (lambda m, v: m.forward(v))
        return call(down, self._act[0](call(gate, x)) * call(up, x))


class ExpertLinears(nn.ModuleList):
    """Fused mixture-of-experts weights as one :class:`_Expert` per expert (see the module
    docstring); called like the fused module, with the router's choices."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]) -> None:
        experts, double, hidden = fused.gate_up_proj.shape
        intermediate = double // 2
        super().__init__(_Expert(names, hidden, intermediate, fused.act_fn) for _ in range(experts))
        self.names = names
        for index, expert in enumerate(self):
            gate, up = fused.gate_up_proj[index].detach().chunk(2, dim=0)
            for name, weight in zip(names, (gate, up, fused.down_proj[index].detach())):
                getattr(expert, name).weight = nn.Parameter(weight.clone() if not weight.is_meta else weight.new_empty(weight.shape), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        calibrating = _ALL_EXPERTS.get()
        if calibrating:  # every expert sees every token, for its statistics; the output keeps the routing
            for expert in self:
                expert(hidden_states)
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            routed = expert(hidden_states[token], hooks=not calibrating)
            out.index_add_(0, token, (routed * top_k_weights[token, slot, None]).to(out.dtype))
        return out


@contextmanager
def all_experts_calibrating() -> Iterator[None]:
    """Within this context every :class:`ExpertLinears` runs each expert on every token (hooks
    see them all) and computes its output from the routed tokens alone, hooks not called."""
    token = _ALL_EXPERTS.set(True)
    try:
        yield
    finally:
        _ALL_EXPERTS.reset(token)


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == 3 and down.ndim == 3


def _expert_names(model_type: str | None) -> tuple[str, str, str]:
    """Each expert's gate, up and down names in the model's original checkpoints, read from
    transformers' conversion mapping (which merges them into the fused tensors on loading)."""
    gate_up, down = None, None
    for conversion in (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []:
        sources = getattr(conversion, "source_patterns", None) or []
        targets = getattr(conversion, "target_patterns", None) or []
        names = [m.group(1) for p in sources if (m := re.search(r"experts\.\*\.(\w+)\.weight$", p))]
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(names) == 2:
            gate_up = names
        elif any(t.endswith("experts.down_proj") for t in targets) and len(names) == 1:
            down = names
    return (gate_up[0], gate_up[1], down[0]) if gate_up and down else EXPERT_NAMES


def _check_fused(name: str, module: nn.Module) -> None:
    """SqueezeError unless the fused experts are the plain kind: gate and up halves, no biases."""
    extra = sorted(n for n, _ in module.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj"))
    experts, double, hidden = module.gate_up_proj.shape
    if extra or double % 2 or tuple(module.down_proj.shape) != (experts, hidden, double // 2) or not hasattr(module, "act_fn"):
        raise SqueezeError(
            f"the mixture-of-experts weights of {name} ({type(module).__name__}: gate_up_proj "
            f"{list(module.gate_up_proj.shape)}, down_proj {list(module.down_proj.shape)}"
            + (f", {', '.join(extra)}" if extra else "")
            + ") are not in the gate/up/down layout squeeze splits per expert; it cannot compress them"
        )


def as_linear_layers(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` inside ``model`` by an equivalent :class:`TransposedLinear`, and
    every fused mixture-of-experts module by :class:`ExpertLinears` (in place; on the meta device
    too); the names of the modules replaced. SqueezeError for fused experts of another layout."""
    replaced = []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = None
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            new: nn.Module = _linear_for(module)
        elif _is_fused_experts(module) and not isinstance(module, ExpertLinears):
            _check_fused(name, module)
            names = names or _expert_names(model_type)
            new = ExpertLinears(module, names)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module``'s checkpoint stores its weight [in, out] (a ``Conv1D`` held as Linear)."""
    return bool(getattr(module, "stored_transposed", False))


def stored_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> torch.Tensor:
    """``module``'s tensor ``attr`` in the layout the checkpoint stores (and back: the transpose is
    its own inverse)."""
    return tensor.T if attr == "weight" and is_transposed(module) and tensor.ndim == 2 else tensor


def to_held_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a checkpoint's tensors, by name) with the weights of ``model``'s
    :class:`TransposedLinear` layers turned into the layout the model holds."""
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if is_transposed(module) and key in state:
            state[key] = state[key].T.contiguous()
    return state


def expert_layers(model: nn.Module, layers: list[str]) -> list[str]:
    """The names among ``layers`` that are projections of one expert of an :class:`ExpertLinears`."""
    owners = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, ExpertLinears))
    return [n for n in layers if n.startswith(owners)] if owners else []


def has_experts(model: nn.Module) -> bool:
    """Whether ``model`` holds mixture-of-experts weights split per expert (:class:`ExpertLinears`)."""
    return any(isinstance(m, ExpertLinears) for m in model.modules())


def uncompressed_matrices(model: nn.Module, compressed: set[str]) -> dict[str, str]:
    """Every weight matrix (a parameter of two or more dimensions) of ``model`` outside the
    ``compressed`` layers, a tied one once, with why it was left as it is."""
    inside = tuple(f"{n}." for n in compressed)
    seen: set[int] = set()
    left: dict[str, str] = {}
    for name, module in model.named_modules():
        if name in compressed or name.startswith(inside):
            continue
        for attr, param in module.named_parameters(recurse=False):
            if param is None or param.ndim < 2 or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Embedding):
                why = "embedding (a lookup table, not a matrix product)"
            elif isinstance(module, nn.Linear):
                why = "Linear layer outside the targets, or matched by an ignore pattern"
            else:
                why = f"{type(module).__name__} is not a Linear layer (e.g. a mixture-of-experts router), so no method applies"
            left[f"{name}.{attr}" if name else attr] = why
    return left
