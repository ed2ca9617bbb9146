"""The teacher-logit cache: run the teacher once, keep a few tokens per position.

Per position: the teacher's k most likely tokens, then ``samples`` draws from its distribution
off those k (see :func:`squeeze.distill.losses.kd_loss_cached`). A cache folder holds
``cache.json`` and shards ``logits-NNNNN.safetensors``, each with ``values`` (float16
[windows, seq_len − 1, k + samples]: log softmax(teacher logits / τ) at those tokens),
``indices`` (int32, their ids) and ``windows`` (int64, which training windows the rows belong to).
``cache.json`` records what the values depend on (teacher, window length, a hash of the token
windows, k, samples, τ, precision, seed); a cache that does
not match the run is refused rather than silently used. Shards are read lazily (memory-mapped), so
a cache larger than memory works.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from squeeze.distill.losses import top_k_logprobs
from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.evaluate import model_device
from squeeze.tensorfiles import save_tensors_file

META_FILE = "cache.json"
SHARD_WINDOWS = 256


def windows_fingerprint(windows: torch.Tensor) -> str:
    """SHA-256 of the token windows: a cache is only valid for exactly these tokens."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy()).hexdigest()


def cache_identity(teacher: str, windows: torch.Tensor, k: int, samples: int, temperature: float, precision: str, seed: int) -> dict[str, Any]:
    return {
        "teacher": teacher,
        "seq_len": int(windows.shape[1]),
        "windows_sha256": windows_fingerprint(windows),
        "top_k": k,
        "samples": samples,
        "temperature": temperature,
        "precision": precision,
        "seed": seed,
    }


def is_cache(folder: Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def check_cache_use(folder: Path, config, causal: bool) -> None:
    """SqueezeError when a teacher cache cannot serve this run (cheap: before anything loads)."""
    if not causal:
        raise OptionError("a teacher cache stores language-model logits; an encoder teacher has none (drop {0})", "teacher_cache")
    if config.alpha == 0:
        raise OptionError("{0} 0 trains on cross-entropy alone: there are no teacher logits to cache (drop {1})", "alpha", "teacher_cache")
    if config.hidden_loss is not None:
        raise OptionError("the hidden-state loss needs the live teacher's hidden states; drop {0} or {1}", "teacher_cache", "hidden_loss")
    if folder.exists() and not is_cache(folder):
        raise SqueezeError(f"teacher cache {folder} exists but is not a squeeze teacher cache (no {META_FILE})")


@torch.no_grad()
def build_cache(
    teacher: torch.nn.Module | Callable[[list[int]], torch.nn.Module],
    windows: torch.Tensor,
    needed: list[int],
    identity: dict[str, Any],
    folder: Path,
    batch_size: int,
    autocast: Callable[[], Any],
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Write the teacher's top-k log-probabilities (and tail draws) for the training windows
    ``needed`` into ``folder``. ``teacher`` is the model, or gives the model to ask for the
    window ids of one shard (a streamed teacher computes them shard by shard)."""
    k = identity["top_k"]
    for shard, start in enumerate(range(0, len(needed), SHARD_WINDOWS)):
        ids = needed[start : start + SHARD_WINDOWS]
        model = teacher if isinstance(teacher, torch.nn.Module) else teacher(ids)
        device = model_device(model)
        values, indices = [], []
        for batch_start in range(0, len(ids), batch_size):
            batch = windows[ids[batch_start : batch_start + batch_size]].to(device)
            with autocast():
                logits = model(input_ids=batch).logits[:, :-1]
            # the tail draws of window w depend only on (seed, w): the same cache whatever the batch size
            draws = [
                top_k_logprobs(row[None], k, identity["temperature"], identity["samples"], _generator(identity["seed"], window))
                for row, window in zip(logits, ids[batch_start : batch_start + batch_size])
            ]
            v, i = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
            values.append(v.cpu())
            indices.append(i.cpu())
            if on_batch:
                on_batch(batch.shape[0])
        save_tensors_file(
            {"values": torch.cat(values), "indices": torch.cat(indices), "windows": torch.tensor(ids, dtype=torch.int64)},
            folder / f"logits-{shard:05d}.safetensors",
        )
    meta = {**identity, "windows": len(needed), "shard_windows": SHARD_WINDOWS}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _generator(seed: int, window: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + window)


class LogitCache:
    """Read access to a finished cache: ``fetch(window ids)`` → (values, indices)."""

    def __init__(self, folder: Path, identity: dict[str, Any], needed: list[int]) -> None:
        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        differ = [key for key in identity if meta.get(key) != identity[key]]
        if differ:
            shown = ", ".join(f"{key} {meta.get(key)!r} in the cache vs {identity[key]!r} now" for key in differ[:2])
            raise OptionError(
                f"teacher cache {literal(folder)} was made for another run ({literal(shown)}); point {{0}} at a new folder", "teacher_cache"
            )
        self.samples = int(meta.get("samples", 0))
        self._files = {}
        self._row: dict[int, tuple[Path, int]] = {}
        for shard in sorted(folder.glob("logits-*.safetensors")):
            handle = safe_open(str(shard), framework="pt")
            self._files[shard] = handle
            for row, window in enumerate(handle.get_tensor("windows").tolist()):
                self._row[window] = (shard, row)
        missing = [w for w in needed if w not in self._row]
        if missing:
            raise OptionError(
                f"teacher cache {literal(folder)} lacks {len(missing)} of the {len(needed)} windows this run trains on "
                "(it was made for fewer steps); point {0} at a new folder",
                "teacher_cache",
            )

    def fetch(self, window_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = [], []
        for window in window_ids:
            shard, row = self._row[window]
            handle = self._files[shard]
            values.append(handle.get_slice("values")[row : row + 1])
            indices.append(handle.get_slice("indices")[row : row + 1])
        return torch.cat(values), torch.cat(indices)
