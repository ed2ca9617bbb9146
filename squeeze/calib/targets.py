"""Which Linear layers a pass touches: name patterns in, module names out."""

from __future__ import annotations

import fnmatch
import math
import re

from torch import nn

from squeeze.errors import SqueezeError

# lm_head stays in full precision by default: it is small next to the blocks in most models and
# the logits are very sensitive to it. Embeddings are nn.Embedding, never matched.
DEFAULT_IGNORE: tuple[str, ...] = ("lm_head", "*.lm_head", "re:.*(classifier|pooler|score).*")


def matches(name: str, pattern: str) -> bool:
    """``re:`` patterns are regular expressions searched in the name; others are shell globs."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_patterns(patterns) -> None:
    """SqueezeError for a ``re:`` pattern that is not a valid regular expression (before any matching)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise SqueezeError(f"module pattern {pattern!r} is not a valid regular expression: {exc}") from None


def select_linears(
    model: nn.Module, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = DEFAULT_IGNORE
) -> dict[str, nn.Linear]:
    """The Linear layers of ``model`` named by ``targets`` (all when empty) and not by ``ignore``.

    Patterns are shell globs over the module's dotted name (``*.mlp.*``) or regular expressions
    prefixed with ``re:``. A target pattern that matches no Linear layer is a SqueezeError.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise SqueezeError("the model has no Linear layers to compress")
    check_patterns((*targets, *ignore))
    for pattern in targets:
        if not any(matches(name, pattern) for name in linears):
            example = next(iter(linears))
            raise SqueezeError(
                f"module pattern {pattern!r} matches no Linear layer (names look like {example!r})"
            )
    chosen = {
        name: m
        for name, m in linears.items()
        if (not targets or any(matches(name, p) for p in targets))
        and not any(matches(name, p) for p in ignore)
    }
    if not chosen:
        raise SqueezeError("no Linear layer is left to compress after applying the target and ignore patterns")
    return chosen


def check_group_size(layers: dict[str, nn.Linear], group_size: int) -> None:
    """Every layer's input dimension must be a multiple of the group size; say which fail and what fits."""
    bad = {name: m.in_features for name, m in layers.items() if m.in_features % group_size}
    if not bad:
        return
    common = 0
    for m in layers.values():
        common = math.gcd(common, m.in_features)
    fits = [g for g in (16, 32, 64, 128, 256) if common % g == 0]
    dims = sorted(set(bad.values()))
    shown = ", ".join(list(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    hint = f"group sizes that fit every layer: {', '.join(map(str, fits))}" if fits else "no power-of-two group size fits every layer"
    raise SqueezeError(
        f"group size {group_size} does not divide the input dimension ({', '.join(map(str, dims))}) of {shown}; {hint}"
    )


def fitting_group_size(layers: dict[str, nn.Linear], preferred: int = 128) -> int:
    """``preferred`` if it divides every layer's input dimension, else the largest power of two
    below it that does (SmolLM2's 576-wide inputs take 64); SqueezeError if not even 16 fits."""
    size = preferred
    while size >= 16:
        if all(m.in_features % size == 0 for m in layers.values()):
            return size
        size //= 2
    check_group_size(layers, preferred)  # raises, naming the layers and what fits
    return preferred
