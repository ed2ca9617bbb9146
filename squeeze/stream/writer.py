"""A safetensors writer fed part by part: each part's tensors are written out when the part ends
(or sooner, when a shard is full), so it holds at most one part and no file exceeds the shard
size; ``close`` names the shards and writes the standard index."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from squeeze.formats.files import WEIGHTS_NAME, save_tensors_file


class ShardWriter:
    """Shards of at most ``max_bytes`` (a single larger tensor gets one of its own) in ``folder``."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self._flush()
            self.pending[name] = tensor.detach().contiguous().cpu()
            self.pending_bytes += nbytes
            self.total += nbytes

    def end_part(self) -> None:
        """The current part is complete: write what is pending."""
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        path = self.folder / f"part-{len(self.written) + 1:05d}.safetensors"
        save_tensors_file(self.pending, path)
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """The files written: ``model.safetensors`` alone, or shards named as transformers names them, with the index."""
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            path = self.written[0][0].rename(self.folder / WEIGHTS_NAME)
            return [path]
        count, files, weight_map = len(self.written), [], {}
        for number, (path, names) in enumerate(self.written, start=1):
            final = path.rename(self.folder / f"model-{number:05d}-of-{count:05d}.safetensors")
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(index, indent=2))
        return files
