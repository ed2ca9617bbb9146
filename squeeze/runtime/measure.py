"""How fast a causal LM runs (prefill and decode tokens/s) and how much memory a process peaks at."""

from __future__ import annotations

import threading
import time

import psutil
import torch
from torch import nn

from squeeze.generate import cache_arguments, returned_cache


class RssSampler:
    """Highest resident set size seen by a background thread (every 5 ms), in bytes."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_speed(model: nn.Module, prompt: torch.Tensor, decode_tokens: int = 128, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` prefill and decode throughput (tokens/s) of a causal LM with its KV cache.

    Prefill: one forward over ``prompt`` [1, n] computing only the last position's logits (what
    generation needs). Decode: ``decode_tokens`` greedy steps after it, one token per forward.
    """
    device = prompt.device
    prefill_best = decode_best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, **cache_arguments(model, None), logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - start
        past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, **cache_arguments(model, past), logits_to_keep=1)
            past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - start
        prefill_best = max(prefill_best, prompt.shape[1] / prefill)
        decode_best = max(decode_best, decode_tokens / decode)
    return prefill_best, decode_best
