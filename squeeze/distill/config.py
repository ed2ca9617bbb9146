"""The distill pass's frozen config: loss, optimisation schedule, checkpoints and teacher cache."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from squeeze.distill.losses import HIDDEN_LOSSES
from squeeze.errors import SqueezeError

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
            raise SqueezeError(f"temperature must be positive, got {self.temperature:g}")
        if not 0 <= self.alpha <= 1:
            raise SqueezeError(f"alpha weighs KD against cross-entropy and must be in [0, 1], got {self.alpha:g}")
        if self.cache_samples < 0:
            raise SqueezeError(f"cache-samples must be 0 (top-k only) or positive, got {self.cache_samples}")
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "cache_topk"):
            if getattr(self, name) < 1:
                raise SqueezeError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise SqueezeError(f"{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SqueezeError(f"learning rate must be positive, got {self.lr:g}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.hidden_weight < 0:
            raise SqueezeError("weight decay, gradient clipping norm and hidden-loss weight must be non-negative")
        if not 0 <= self.warmup < 1:
            raise SqueezeError(f"warmup is a share of the steps in [0, 1), got {self.warmup:g}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SqueezeError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio:g}")
        if self.precision not in PRECISIONS:
            raise SqueezeError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if self.hidden_loss is not None and self.hidden_loss not in HIDDEN_LOSSES:
            raise SqueezeError(f"unknown hidden loss {self.hidden_loss!r}; choose one of: {', '.join(HIDDEN_LOSSES)}")
        if self.embedding_loss not in HIDDEN_LOSSES:
            raise SqueezeError(f"unknown embedding loss {self.embedding_loss!r}; choose one of: {', '.join(HIDDEN_LOSSES)}")
        if self.layer_map and self.hidden_loss is None:
            raise SqueezeError("a layer map pairs hidden states for the hidden-state loss: set --hidden-loss cosine or mse")

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
