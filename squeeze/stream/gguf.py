"""The tensors of a GGUF file by their transformers names, each dequantized only when asked for.

The file is memory-mapped (gguf's reader); names are mapped and each tensor is dequantized and
reordered exactly as transformers does when it loads the whole file (its name map and tensor
processor for the architecture), so a streamed pass sees the weights a resident one does. After
each read the mapped pages are handed back, so memory does not grow with the part of the file read.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from gguf import GGUFReader, dequantize
from torch import nn

from squeeze.errors import SqueezeError


class GGUFTensors:
    """Like squeeze.stream.lazy.CheckpointTensors, for a GGUF file and the meta ``model`` built
    from its config."""

    def __init__(self, path: Path, model: nn.Module) -> None:
        self.folder = Path(path)
        self.reader = GGUFReader(str(path))
        architecture = str(gguf_utils.read_field(self.reader, "general.architecture")[0])
        self.parsed = gguf_utils.load_gguf_checkpoint(str(path), return_tensors=False)
        processor_class = gguf_utils.TENSOR_PROCESSORS.get(architecture, gguf_utils.TensorProcessor)
        self.processor = processor_class(config=self.parsed.get("config", {}))
        self.mapping = gguf_utils.get_gguf_hf_weights_map(model, self.processor)
        self.by_name = {self.mapping[t.name]: t for t in self.reader.tensors if t.name in self.mapping}

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, dequantized to float32 (as transformers loads GGUF weights)."""
        out = {}
        for name in names:
            tensor = self.by_name[name]
            result = self.processor.process(
                weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name, tensor_key_mapping=self.mapping,
                parsed_parameters=self.parsed,
            )
            if self.mapping.get(result.name) != name:
                raise SqueezeError(f"cannot stream {self.folder.name}: its tensor {tensor.name} does not map to one weight; run it without --stream")
            out[name] = torch.from_numpy(np.copy(result.weights))
        self._release_pages()
        return out

    def _release_pages(self) -> None:
        """Drop the file's pages read so far from this process's memory (they stay in the page cache)."""
        mapped = getattr(self.reader.data, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)
