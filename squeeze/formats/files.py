"""The files every checkpoint format shares: safetensors (sharded when large), config.json, the
tokenizer, and the tensors outside the compressed layers.

The lowest layer of ``squeeze.formats``: it knows files and state dicts, not formats, and is
what ``squeeze.models`` and each format's writer and reader build on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.linears import stored_tensor
from squeeze.tensorfiles import save_tensors_file

MAX_SHARD_BYTES = 5 * 10**9  # the default largest safetensors file, as transformers' "5GB"
WEIGHTS_NAME = "model.safetensors"


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder as a dict; SqueezeError when it cannot be read."""
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise SqueezeError(f"cannot read {Path(folder) / 'config.json'}: {exc}") from exc


_AUTO_CLASSES = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "encoder": "AutoModel"}


def auto_class(kind: str) -> type:
    """The transformers Auto class that builds a model of ``kind`` ("causal", "seq2seq" or "encoder")."""
    return getattr(transformers, _AUTO_CLASSES[kind])


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (shards merged), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def dense_tensors(model: nn.Module, dtype: torch.dtype | None = None, skip: type | tuple[type, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors outside the compressed layers (modules of type ``skip``), tied copies stored once.

    ``dtype`` casts the floating tensors (embeddings, norms, heads, biases), e.g. back to the
    bfloat16 a model was stored in. Weights of layers held transposed (squeeze.linears) go back
    to the checkpoint's layout.
    """
    compressed = [n for n, m in model.named_modules() if isinstance(m, skip)]
    inside_compressed = tuple(f"{n}." for n in compressed)
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        if key.startswith(inside_compressed):
            continue
        # tied weights (lm_head = embeddings) share storage: store them once, under the first name
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        module_name, _, attr = key.rpartition(".")
        tensor = stored_tensor(model.get_submodule(module_name), attr, tensor)  # as the checkpoint lays it out
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write ``state`` as one safetensors file, or shards plus the standard index when large."""
    writer = ShardWriter(out_dir, max_shard_bytes)
    writer.add(state)
    return writer.close()


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` (a single larger tensor gets one of its own) in
    ``folder``, fed tensors in any number of ``add`` calls: a shard is written as soon as it is
    full, or when ``end_part`` says a part (e.g. one streamed block) is complete, so the writer
    holds at most one shard; ``close`` names the shards as transformers does and writes the index."""

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


def write_config_files(model: nn.Module, out_dir: Path, quant_config: dict | None, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """config.json (with ``quant_config`` as its quantization_config, none if None), generation config, tokenizer."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    if quant_config is not None:
        config_dict["quantization_config"] = quant_config
    if dtype is not None:
        config_dict["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
