"""Encoder-decoders (T5, BART) on plain text windows.

Calibration and evaluation cut text into token windows for every kind of model. An
encoder-decoder gets each window in two: the encoder reads the first half, and the decoder,
teacher-forced, predicts the second half token by token (its inputs are the decoder's start token
and the second half shifted right). So the decoder is scored as a causal LM is, on next-token
perplexity, KL and top-1 against the original, conditioned on real text through cross-attention,
and calibration runs both stacks on what they see in that use.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def split_at(length: int) -> int:
    """Where a window of ``length`` tokens is cut: the encoder reads the tokens before it."""
    return length // 2


def decoder_start(model: nn.Module) -> int:
    """The token an encoder-decoder's decoder starts from (its config's ``decoder_start_token_id``,
    else the padding token)."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if start is None:
        raise ValueError(f"{type(model).__name__} names no decoder start token")
    return int(start)


def seq2seq_inputs(ids: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
    """The forward arguments of an encoder-decoder for token windows ``ids`` [n, L]: the first half
    to the encoder, the second half shifted right behind ``start`` to the decoder."""
    cut = split_at(ids.shape[1])
    encoder = ids[:, :cut]
    decoder = torch.cat([torch.full_like(ids[:, :1], start), ids[:, cut:-1]], dim=1)
    return {"input_ids": encoder, "attention_mask": torch.ones_like(encoder), "decoder_input_ids": decoder}


class DecoderScoring(nn.Module):
    """An encoder-decoder as :func:`squeeze.evaluate.compare_causal` scores a causal LM: called
    with windows' token ids, it returns the decoder's logits, which predict the tokens from
    :meth:`first_target` on (the second half; see the module docstring)."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self._inner = [model]  # in a list: the wrapped model is not a submodule of the view
        self.start = start

    @property
    def input_device(self) -> torch.device:
        """Where the token ids go: the wrapped model's device."""
        model = self._inner[0]
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else getattr(model, "input_device", torch.device("cpu"))

    @staticmethod
    def first_target(length: int) -> int:
        """The first position of a window of ``length`` tokens that the decoder predicts."""
        return split_at(length)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self._inner[0](**seq2seq_inputs(input_ids, self.start)).logits)


def scoring_view(model: nn.Module) -> nn.Module:
    """What :func:`squeeze.evaluate.compare_causal` scores: ``model``, or an encoder-decoder's
    :class:`DecoderScoring` view."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return DecoderScoring(model, decoder_start(model))
    return model


def forward_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``model`` is called with on token windows ``ids``: the ids themselves, or for an
    encoder-decoder the two halves (:func:`seq2seq_inputs`)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return seq2seq_inputs(ids, decoder_start(model))
    return {"input_ids": ids}
