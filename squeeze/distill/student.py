"""The student: a spec derived from the teacher (fewer blocks, narrower) or a model of its own.

``layers:K`` keeps K of the teacher's blocks, evenly spaced from the first to the last, with their
weights (the DistilBERT initialisation); ``layers:0,7,14`` names the blocks; ``depth:F`` keeps
that share of the blocks (``depth:0.5``: half, rounded), spaced like ``layers:K``. ``width:F`` builds a
model of the teacher's family with hidden and MLP sizes scaled by F and random weights. Anything
else is a model path or built-in name, loaded like any squeeze input; if its Linear layers hold
exact zeros (a pruned checkpoint) those zeros are kept through training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.calib.blocks import block_list, is_encoder_decoder

PRUNED_LAYER_SHARE = 0.01  # a Linear with at least this share of exact zeros keeps them as a mask


@dataclass(frozen=True)
class StudentSpec:
    kind: str  # "layers", "width" or "model"
    layers: tuple[int, ...] = ()  # kept teacher blocks (kind "layers"), filled in by resolve_layers
    count: int = 0  # layers:K before the teacher's depth is known
    share: float = 0.0  # depth:F before the teacher's depth is known
    width: float = 1.0
    model: str = ""

    def describe(self) -> str:
        if self.kind == "layers":
            if self.share and not self.layers:
                return f"{self.share:g} of the teacher's blocks"
            return f"{len(self.layers) or self.count} teacher blocks" + (f" {list(self.layers)}" if self.layers else "")
        if self.kind == "width":
            return f"width x{self.width:g}, random init"
        return self.model


def _fraction(spec: str, text: str, usage: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1:
        raise SqueezeError(f"student spec {spec!r}: {usage}")
    return value


def parse_student(spec: str) -> StudentSpec:
    """``layers:K``, ``layers:I,J,...``, ``depth:F``, ``width:F`` or a model (checked when loaded)."""
    head, sep, rest = spec.partition(":")
    if sep and head == "depth":
        return StudentSpec("layers", share=_fraction(spec, rest, "depth:F keeps a share of the teacher's blocks, in (0, 1], e.g. depth:0.5"))
    if sep and head == "layers":
        items = [item.strip() for item in rest.split(",")]
        if not all(item.isdigit() for item in items):
            raise SqueezeError(f"student spec {spec!r}: write layers:K (a count) or layers:I,J,... (teacher block indices)")
        numbers = [int(item) for item in items]
        if len(numbers) == 1:
            if numbers[0] < 1:
                raise SqueezeError(f"student spec {spec!r}: keep at least one block")
            return StudentSpec("layers", count=numbers[0])
        if numbers != sorted(set(numbers)):
            raise SqueezeError(f"student spec {spec!r}: block indices must be increasing and distinct")
        return StudentSpec("layers", layers=tuple(numbers), count=len(numbers))
    if sep and head == "width":
        return StudentSpec("width", width=_fraction(spec, rest, "width:F takes a factor in (0, 1], e.g. width:0.5"))
    return StudentSpec("model", model=spec)


def resolve_layers(spec: StudentSpec, depth: int) -> StudentSpec:
    """Fill in which teacher blocks a ``layers:`` student keeps; SqueezeError if they do not exist."""
    if spec.kind != "layers":
        return spec
    if spec.share:
        spec = StudentSpec("layers", count=max(1, round(spec.share * depth)))
    if spec.layers:
        if spec.layers[-1] >= depth:
            raise SqueezeError(f"student keeps teacher block {spec.layers[-1]}, but the teacher has blocks 0..{depth - 1}")
        return spec
    if spec.count > depth:
        raise SqueezeError(f"student layers:{spec.count} keeps more blocks than the teacher has ({depth})")
    if spec.count == 1:
        return StudentSpec("layers", layers=(depth - 1,), count=1)
    kept = tuple(round(i * (depth - 1) / (spec.count - 1)) for i in range(spec.count))
    return StudentSpec("layers", layers=kept, count=spec.count)


def check_layer_map(layer_map: tuple[tuple[int, int], ...], student_depth: int, depth: int) -> None:
    """SqueezeError for a (student block, teacher block) pair that does not exist."""
    for s, t in layer_map:
        if s >= student_depth or t >= depth:
            raise SqueezeError(f"layer map pair {s}:{t} is out of range: the student has {student_depth} blocks, the teacher {depth}")


def teacher_depth(model: nn.Module) -> int:
    """The teacher's number of blocks; SqueezeError for an encoder-decoder (students are cut from
    one stack of blocks)."""
    if is_encoder_decoder(model):
        raise SqueezeError(f"distillation trains causal LMs and encoders; {type(model).__name__} is an encoder-decoder")
    return len(block_list(model)[1])


def keep_blocks(teacher: nn.Module, kept: tuple[int, ...]) -> nn.Module:
    """A copy of ``teacher`` with only the blocks ``kept``, their weights copied."""
    name, blocks = block_list(teacher)
    # copy everything but the blocks, then the kept blocks: never the whole teacher at once
    skeleton = copy.deepcopy(teacher, memo={id(blocks): nn.ModuleList()})
    new_blocks = nn.ModuleList(copy.deepcopy(blocks[i]) for i in kept)
    for index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # the KV-cache slot of an attention layer
                module.layer_idx = index
    parent, _, attr = name.rpartition(".")
    setattr(skeleton.get_submodule(parent) if parent else skeleton, attr, new_blocks)
    config = skeleton.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    return skeleton


_WIDTH_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def narrow_model(teacher: nn.Module, factor: float, seed: int) -> nn.Module:
    """A randomly initialised model of the teacher's class with hidden/MLP sizes and head counts
    scaled by ``factor`` (the head dimension kept)."""
    config = copy.deepcopy(teacher.config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    new_heads = max(1, round(heads * factor))
    kv = getattr(config, "num_key_value_heads", None)
    if kv is not None:
        new_kv = max(1, round(kv * factor))
        while new_heads % new_kv:
            new_kv -= 1
        config.num_key_value_heads = new_kv
    config.num_attention_heads = new_heads
    config.hidden_size = new_heads * head_dim
    if hasattr(config, "head_dim"):
        config.head_dim = head_dim
    config.intermediate_size = max(1, round(config.intermediate_size * factor))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher)(config)
    return student


def derive_student(teacher: nn.Module, spec: StudentSpec, seed: int) -> nn.Module:
    """The student a ``layers:`` or ``width:`` spec describes, in float32 on the teacher's device."""
    device = next(teacher.parameters()).device
    if spec.kind == "layers":
        student = keep_blocks(teacher, spec.layers)
    elif spec.kind == "width":
        student = narrow_model(teacher, spec.width, seed)
    else:
        raise ValueError(spec.kind)
    return student.to(device=device, dtype=torch.float32)


def pruning_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks (True where a weight may be nonzero) of the Linear layers that were pruned, by
    parameter name. A head tied to the embeddings is never pruned (the prune pass refuses it), so
    its zeros (a dequantized GGUF's grid holds some) are left free."""
    names = {id(p): name for name, p in model.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    masks = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in embeddings:
            keep = module.weight != 0
            if (~keep).sum() >= PRUNED_LAYER_SHARE * keep.numel():
                masks[names[id(module.weight)]] = keep
    return masks


def check_vocab_sizes(teacher_config, student_config) -> None:
    """KD compares logits id by id: the vocabularies must have one size (read from the configs)."""
    t_vocab, s_vocab = teacher_config.vocab_size, student_config.vocab_size
    if t_vocab != s_vocab:
        raise SqueezeError(
            f"teacher and student have different vocabularies ({t_vocab:,} vs {s_vocab:,} tokens); distillation compares "
            "their outputs token id by token id, so the student must use the teacher's tokenizer"
        )


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_config, student_config) -> None:
    """KD compares logits id by id: teacher and student must share one tokenizer."""
    check_vocab_sizes(teacher_config, student_config)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise SqueezeError(
            "teacher and student tokenizers map tokens to different ids; distillation compares their outputs token id by "
            "token id, so the student must use the teacher's tokenizer"
        )


def default_layer_map(spec: StudentSpec, teacher_depth: int, student_depth: int) -> tuple[tuple[int, int], ...]:
    """(student block, teacher block) pairs for the hidden loss: each kept block with the one it came
    from; otherwise the student's blocks spread evenly over the teacher's, last onto last."""
    if spec.kind == "layers":
        return tuple(enumerate(spec.layers))
    return tuple((i, round((i + 1) * teacher_depth / student_depth) - 1) for i in range(student_depth))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on the matrices of Linear layers; none on norms, biases and embeddings
    (a head tied to the embeddings counts as an embedding)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    decay = [p for p in params if id(p) in linear and id(p) not in embeddings]
    chosen = {id(p) for p in decay}
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in chosen], "weight_decay": 0.0},
    ]
