"""The distill pass's frozen config: loss, optimisation schedule, checkpoints and teacher cache."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from squeeze.distill.losses import HIDDEN_LOSSES
from squeeze.errors import OptionError, SqueezeError, literal

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from the teacher.

    Causal LMs: ``loss = α · τ² · KL(teacher/τ ‖ student/τ) + (1 − α) · CE(next token)``, plus
    ``hidden_weight`` · the hidden-state loss when ``hidden_loss`` is set. Encoders (no LM head):
    ``embedding_loss`` between the mean-pooled embeddings, plus the hidden-state loss.
    ``layer_map`` pairs (student block, teacher block) whose outputs the hidden loss compares;
    by default each block of a ``layers:k`` student is paired with the teacher block it came from.
    The learning rate warms up linearly over ``warmup`` (a share of the steps), then follows a
    cosine down to ``min_lr_ratio · lr``. ``steps`` counts optimizer steps; each consumes
    ``batch_size · grad_accum · processes`` windows.
    """

    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term; 0 is plain cross-entropy training
    steps: int = 100
    batch_size: int = 4  # windows per forward pass, per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01  # on matrices only, never on norms, biases or embeddings
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    precision: str = "auto"  # bf16 autocast where the device runs it fast (CUDA with bf16), else fp32
    hidden_loss: str | None = None  # cosine | mse
    hidden_weight: float = 1.0
    layer_map: tuple[tuple[int, int], ...] = ()
    embedding_loss: str = "cosine"  # encoders
    checkpoint_every: int = 0  # optimizer steps; 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    eval_every: int = 0  # optimizer steps between held-out perplexity checks; 0: only at the end
    cache_topk: int = 16  # teacher cache: the most likely tokens stored per position
    cache_samples: int = 48  # teacher cache: draws per position from the teacher's distribution off those
    fsdp: bool = False  # shard the student, its gradients and AdamW moments over the torchrun processes

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise OptionError(f"{{0}} must be positive, got {self.temperature:g}", "temperature")
        if not 0 <= self.alpha <= 1:
            raise OptionError(f"{{0}} weighs KD against cross-entropy and must be in [0, 1], got {self.alpha:g}", "alpha")
        if self.cache_samples < 0:
            raise OptionError(f"{{0}} must be 0 (top-k only) or positive, got {self.cache_samples}", "cache_samples")
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "cache_topk"):
            if getattr(self, name) < 1:
                raise OptionError(f"{{0}} must be at least 1, got {getattr(self, name)}", name)
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise OptionError(f"{{0}} must be 0 (off) or positive, got {getattr(self, name)}", name)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError(f"the learning rate {{0}} must be positive, got {self.lr:g}", "lr")
        for name in ("weight_decay", "max_grad_norm", "hidden_weight"):
            if getattr(self, name) < 0:
                raise OptionError(f"{{0}} must be non-negative, got {getattr(self, name):g}", name)
        if not 0 <= self.warmup < 1:
            raise OptionError(f"{{0}} is a share of the steps in [0, 1), got {self.warmup:g}", "warmup")
        if not 0 <= self.min_lr_ratio <= 1:
            raise OptionError(f"{{0}} must be in [0, 1], got {self.min_lr_ratio:g}", "min_lr_ratio")
        for name, choices in (("precision", PRECISIONS), ("hidden_loss", HIDDEN_LOSSES), ("embedding_loss", HIDDEN_LOSSES)):
            value = getattr(self, name)
            if value not in choices and (value is not None or name != "hidden_loss"):
                raise OptionError(f"unknown {{0}} {literal(repr(value))}; choose one of: {', '.join(choices)}", name)
        if self.layer_map and self.hidden_loss is None:
            raise OptionError("{0} pairs hidden states for the hidden-state loss: set {1} cosine or mse", "layer_map", "hidden_loss")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
        warm = self.warmup_steps
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(self.steps - warm, 1)
        floor = self.min_lr_ratio * self.lr
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def trajectory(self) -> dict:
        """The settings that decide the weights a run ends with (a resumed run must match them)."""
        data = asdict(self)
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every"):
            data.pop(name)
        data["layer_map"] = [list(pair) for pair in self.layer_map]
        return data


def parse_layer_map(text: str) -> tuple[tuple[int, int], ...]:
    """``"0:1,1:3"`` → ((0, 1), (1, 3)): student block : teacher block."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        student, sep, teacher = item.partition(":")
        if not sep or not student.strip().isdigit() or not teacher.strip().isdigit():
            raise SqueezeError(f"layer map entry {item!r} is not STUDENT:TEACHER block indices, e.g. 0:1,1:3")
        pairs.append((int(student), int(teacher)))
    if not pairs:
        raise SqueezeError(f"layer map {text!r} is empty; write STUDENT:TEACHER pairs, e.g. 0:1,1:3")
    return tuple(pairs)
