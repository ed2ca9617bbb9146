"""Orthogonal rotations fused into a decoder's weights before quantization (QuaRot, SpinQuant
without the training): the model computes the same function, but its weights and the
activations that reach its Linear layers lose their outlier channels, so round-to-nearest (and
every method built on it) loses less.

Why it is exact. An RMSNorm only divides by the root mean square, which an orthogonal Q keeps:
``rms(x Q) = rms(x)``. So once each norm's scale is folded into the Linear layers that read its
output (scale set to 1; Gemma's ``x̂ · (1 + w)`` form: 1 + w folded, w set to 0), the residual
stream may carry ``x Q`` instead of ``x`` (row vectors, ``y = x Wᵀ + b``):

- the embeddings: ``E → E Q``;
- every Linear reading the residual through a norm (q/k/v, gate/up, a router, the head):
  ``W → W Q``, so that ``(x Q)(W Q)ᵀ = x Wᵀ``;
- every Linear writing into it (o_proj, down_proj): ``W → Qᵀ W``, ``b → b Q``.

Inside attention, each head's values may be rotated too: v_proj's rows of each key-value head
``→ Rᵀ W`` (its bias ``b → b R``) and o_proj's input columns of each attention head ``→ W R``,
one head_dim × head_dim R for all heads (attention mixes positions, never the dimensions of a
head, and with grouped-query attention several query heads read one rotated value head).

Every rotation is fused offline: the checkpoint needs no transform and loads in plain
transformers. The online rotations QuaRot also makes at run time (R4 before down_proj, the
rotated KV cache) are left out. A tied head cannot stay tied: the final norm's scale folded into
it makes it differ from the embeddings, so it gets its own weight and the config says
``tie_word_embeddings: false``.

Only pre-norm decoders with RMSNorm fit (Llama, Mistral, Qwen2/3, Gemma, Phi-3, Mixtral,
Qwen3-MoE): :func:`check_rotatable` refuses the others on the meta model, before any weight is
read. The arithmetic is float64, cast back to each tensor's dtype once, a slice at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from squeeze.calib.blocks import block_list, is_encoder_decoder
from squeeze.calib.folds import NORM, OFFSET_NORM
from squeeze.errors import OptionError, literal
from squeeze.quant.hadamard import Rotation, random_hadamard

ROTATIONS = ("none", "hadamard")
WRITERS = ("o_proj", "down_proj", "w2")  # the Linear layers that add into the residual stream (Mixtral's experts: w2)
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP
CHUNK_ELEMENTS = 1 << 22  # float64 elements rotated at a time (32 MiB)


def check_rotation(rotate: str) -> None:
    """OptionError (naming ``rotate``) unless ``rotate`` is one of ROTATIONS."""
    if rotate not in ROTATIONS:
        raise OptionError(f"{{0}} must be {' or '.join(ROTATIONS)}, got {literal(repr(rotate))}", "rotate")


@dataclass
class _Block:
    """Where the residual stream meets one block: its two norms with what reads each, its writers,
    its value rows (module, first row, rows) and its output projection."""

    readers: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)  # (module with a 2-D weight, the norm it reads)
    writers: list[nn.Module] = field(default_factory=list)
    values: tuple[nn.Module, int, int] | None = None
    output: nn.Module | None = None
    norms: tuple[nn.Module, ...] = ()


@dataclass
class _Layout:
    embed: nn.Embedding
    head: nn.Linear
    final_norm: nn.Module
    blocks: list[_Block]
    algebra: dict[int, str]  # id(norm) → NORM or OFFSET_NORM
    head_dim: int


def _refuse(model: nn.Module, why: str) -> OptionError:
    return OptionError(f"{{0}} hadamard cannot rotate {type(model).__name__}: {literal(why)}", "rotate")


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(weight, torch.Tensor) and weight.ndim == 1
        and not list(module.children())
    )


@torch.no_grad()
def _norm_algebra(norm: nn.Module) -> str | None:
    """NORM when ``norm`` computes ``x / rms(x) · w``, OFFSET_NORM for ``x / rms(x) · (1 + w)``,
    None otherwise (a LayerNorm subtracts the mean, or adds a bias). Found by running a copy with
    random parameters on CPU, so the meta model's norms answer too."""
    probe = copy.deepcopy(norm).to_empty(device="cpu").float()
    generator = torch.Generator().manual_seed(0)
    for param in probe.parameters():
        param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    x = torch.randn(2, probe.weight.numel(), generator=generator) * 100 + 3  # large: eps is negligible; a mean: LayerNorm shows
    y = probe(x).float()
    unit = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    for kind, scale in ((NORM, probe.weight), (OFFSET_NORM, 1 + probe.weight)):
        if torch.allclose(y, unit * scale, rtol=1e-4, atol=1e-4):
            return kind
    return None


def _layout(model: nn.Module) -> _Layout:
    """The parts of ``model`` a rotation changes; OptionError naming ``rotate`` with why when its
    structure does not fit (the module docstring). The meta model is enough."""
    if is_encoder_decoder(model):
        raise _refuse(model, "an encoder-decoder (T5, BART) has two residual streams and cross-attention; only decoder-only models are rotated")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding):
        raise _refuse(model, "its input embeddings are not one embedding table")
    hidden = embed.embedding_dim
    norms = [(n, m) for n, m in model.named_modules() if _is_norm(m) and m.weight.numel() == hidden]
    algebra: dict[int, str] = {}
    probed: dict[type, str | None] = {}
    for name, norm in norms:
        if type(norm) not in probed:  # one probe per class
            probed[type(norm)] = _norm_algebra(norm)
        kind = probed[type(norm)]
        if kind is None:
            raise _refuse(model, f"{name} ({type(norm).__name__}) is not an RMSNorm: a LayerNorm subtracts the mean (or adds a bias), "
                          "which a rotation of the residual stream does not pass through (GPT-2, BERT, GPT-NeoX, Falcon, Phi-2)")
        algebra[id(norm)] = kind
    if not isinstance(head, nn.Linear) or head.in_features != hidden:
        raise _refuse(model, "it has no language-model head reading the residual stream")
    prefix, stack = block_list(model)
    outside = [m for n, m in norms if not n.startswith(prefix + ".")]
    if len(outside) != 1:
        raise _refuse(model, f"{len(outside)} norms outside its blocks, not one final norm before the head")
    blocks = [_block(model, f"{prefix}.{i}", b, hidden) for i, b in enumerate(stack)]
    return _Layout(embed, head, outside[0], blocks, algebra, _head_dim(model, blocks[0]))


def _block(model: nn.Module, name: str, block: nn.Module, hidden: int) -> _Block:
    own = {n: m for n, m in block.named_children() if _is_norm(m)}
    if set(own) != set(BLOCK_NORMS):
        others = ", ".join(sorted(set(own) - set(BLOCK_NORMS))) or "none"
        if "input_layernorm" not in own or any("post" in n or "pre_feedforward" in n for n in set(own) - set(BLOCK_NORMS)):
            why = (f"its blocks normalise the attention or MLP outputs too ({others}): a rotation of the residual stream "
                   "cannot pass a norm on a branch's output (sandwich or post norms: Gemma 2/3, OLMo2)")
        else:
            why = f"its blocks' norms ({', '.join(sorted(own)) or 'none'}) are not one RMSNorm before attention and one before the MLP"
        raise _refuse(model, why)
    attention_norm, mlp_norm = own[BLOCK_NORMS[0]], own[BLOCK_NORMS[1]]
    found = _Block(norms=(attention_norm, mlp_norm))
    attention = None
    for child_name, child in block.named_children():
        if child_name in own:
            continue
        for sub, module in child.named_modules():
            full = f"{name}.{child_name}.{sub}".rstrip(".")
            leaf = sub.rpartition(".")[2]
            weights = {a: p for a, p in module.named_parameters(recurse=False) if p.ndim >= 2}
            if not weights:
                continue
            shape = tuple(next(iter(weights.values())).shape)
            if list(weights) != ["weight"] or len(shape) != 2:
                raise _refuse(model, f"{full} holds weights {', '.join(weights)} {list(shape)} that are not one weight matrix")
            if isinstance(module, nn.Linear) and leaf in WRITERS and module.out_features == hidden:
                found.writers.append(module)
                if leaf == "o_proj":
                    attention, found.output = child, module
            elif shape[1] == hidden:
                found.readers.append((module, child))  # the norm is settled below, once attention is known
            else:
                raise _refuse(model, f"cannot tell how {full} ({shape[1]} → {shape[0]}) meets the residual stream")
    if attention is None:
        raise _refuse(model, f"{name} has no attention output projection o_proj")
    found.readers = [(m, attention_norm if child is attention else mlp_norm) for m, child in found.readers]
    v_proj, qkv = getattr(attention, "v_proj", None), getattr(attention, "qkv_proj", None)
    if isinstance(v_proj, nn.Linear):
        found.values = (v_proj, 0, v_proj.out_features)
    elif isinstance(qkv, nn.Linear):  # Phi-3: q, k, v rows one after the other
        heads, kv_heads, head_dim = _heads(model, attention)
        found.values = (qkv, (heads + kv_heads) * head_dim, kv_heads * head_dim)
    else:
        raise _refuse(model, f"{name}'s attention has no v_proj or qkv_proj")
    return found


def _heads(model: nn.Module, attention: nn.Module) -> tuple[int, int, int]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _head_dim(model: nn.Module, block: _Block) -> int:
    assert block.output is not None and block.values is not None
    attention = next(m for m in model.modules() if getattr(m, "o_proj", None) is block.output)
    heads, kv_heads, head_dim = _heads(model, attention)
    if block.output.in_features != heads * head_dim or block.values[2] != kv_heads * head_dim or heads % kv_heads:
        raise _refuse(model, f"its attention's shapes do not match {heads} heads and {kv_heads} key-value heads of {head_dim}")
    return head_dim


def check_rotatable(model: nn.Module) -> None:
    """OptionError naming ``rotate``, with why, unless :func:`rotate_model` fits ``model``'s
    structure; the meta model is enough (no weight is read)."""
    _layout(model)


@dataclass(frozen=True)
class RotateResult:
    """What :func:`rotate_model` did: the rotations, how many norm scales it folded, and the head
    it untied from the embeddings (its parameters now stored twice)."""

    residual: Rotation
    head: Rotation
    seed: int
    norms_folded: int
    untied: str | None = None
    untied_parameters: int = 0

    def notes(self, dtype: torch.dtype) -> list[str]:
        """The report's lines; ``dtype`` is the one the checkpoint stores dense tensors in."""
        notes = [
            f"rotated (seed {self.seed}): the residual stream by a {self.residual.describe()}, each head's values and outputs by a "
            f"{self.head.describe()}; {self.norms_folded} RMSNorm scales folded into the layers reading them. Fused into the "
            "weights: the checkpoint loads in plain transformers, with no runtime transform",
        ]
        for rotation, where in ((self.residual, "residual stream"), (self.head, "heads")):
            if rotation.kind != "Hadamard":
                notes.append(f"no Hadamard matrix of order {rotation.size} is built here: the {where} got a seeded random orthogonal matrix instead")
        if self.untied:
            extra = self.untied_parameters * dtype.itemsize
            notes.append(f"{self.untied} untied from the embeddings (the final norm is folded into it): +{extra:,} bytes in {str(dtype).removeprefix('torch.')}; "
                         "config.json says tie_word_embeddings: false")
        return notes


def _work_device(tensor: torch.Tensor) -> torch.device:
    return tensor.device if tensor.device.type != "mps" else torch.device("cpu")  # MPS has no float64


@torch.no_grad()
def _rewrite(param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dim: int = 0, start: int = 0,
             stop: int | None = None, step: int = 1) -> None:
    """Replace ``param[start:stop]`` along ``dim`` by ``fn`` of it in float64, in slices of a
    multiple of ``step`` indices (so the float64 copy stays small), each cast back in place."""
    data = param.data
    stop = data.shape[dim] if stop is None else stop
    per_index = max(data.numel() // max(data.shape[dim], 1), 1)
    chunk = max(step, CHUNK_ELEMENTS // per_index // step * step)
    for first in range(start, stop, chunk):
        part = data.narrow(dim, first, min(chunk, stop - first))
        part.copy_(fn(part.to(_work_device(data), torch.float64)).to(part.device, part.dtype))


def _scale(norm: nn.Module, kind: str) -> torch.Tensor:
    weight = norm.weight.detach().to(_work_device(norm.weight), torch.float64)
    return weight + 1 if kind == OFFSET_NORM else weight


def _per_head(rotation: Rotation, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [..., k · head_dim] → each head's slice rotated: x_h R."""
    return lambda x: rotation.apply(x.unflatten(-1, (-1, head_dim))).flatten(-2)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> RotateResult:
    """Fold ``model``'s RMSNorm scales into the layers that read them and rotate its residual
    stream and each head's values by seeded randomised Hadamard matrices, in place (see the
    module docstring): the model computes the same function, up to rounding in its dtype.
    OptionError naming ``rotate`` when its structure does not fit (before anything changes)."""
    layout = _layout(model)
    generator = torch.Generator().manual_seed(seed)
    q = random_hadamard(layout.embed.embedding_dim, generator)
    r = random_hadamard(layout.head_dim, generator)
    head_dim, q_cols, r_cols = layout.head_dim, q.apply, _per_head(r, layout.head_dim)

    untied, untied_parameters = None, 0
    head, embed = layout.head, layout.embed
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        untied = next(n for n, m in model.named_modules() if m is head)
        untied_parameters = head.weight.numel()
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False

    _rewrite(embed.weight, q_cols)
    folded = 0

    def fold(norm: nn.Module, readers: list[nn.Module], values: tuple[nn.Module, int, int] | None = None) -> None:
        nonlocal folded
        kind = layout.algebra[id(norm)]
        scale = _scale(norm, kind)

        def read(w: torch.Tensor) -> torch.Tensor:  # the norm's scale folded in, then W Q
            return q_cols(w * scale)

        def read_values(w: torch.Tensor) -> torch.Tensor:  # and each value head's rows [d, in] → Rᵀ W, as columns of Wᵀ
            return r_cols(read(w).mT).mT

        for module in readers:
            if values is not None and module is values[0]:
                _, first, rows = values
                _rewrite(module.weight, read, 0, 0, first)
                _rewrite(module.weight, read_values, 0, first, first + rows, head_dim)
                _rewrite(module.weight, read, 0, first + rows)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    _rewrite(bias, r_cols, 0, first, first + rows, rows)
            else:
                _rewrite(module.weight, read)
        norm.weight.data.fill_(0.0 if kind == OFFSET_NORM else 1.0)
        folded += 1

    def write(w: torch.Tensor) -> torch.Tensor:  # Qᵀ W = (Wᵀ Q)ᵀ, each column on its own
        return q_cols(w.mT).mT

    def write_heads(w: torch.Tensor) -> torch.Tensor:  # o_proj: and each head's input columns → W R
        return r_cols(write(w))

    for block in layout.blocks:
        for norm in block.norms:
            fold(norm, [m for m, reads in block.readers if reads is norm], block.values)
        for writer in block.writers:
            if writer is block.output:
                _rewrite(writer.weight, write_heads, 1, step=head_dim)
            else:
                _rewrite(writer.weight, write, 1)
            if isinstance(writer.bias, torch.Tensor):
                _rewrite(writer.bias, q_cols, step=writer.bias.numel())
    fold(layout.final_norm, [head])
    return RotateResult(q, r, seed, folded, untied, untied_parameters)
