"""Models in and out: where a model comes from, checks that its files are whole, loading it (or
only its shapes), and output folders that appear atomically.

- :mod:`~squeeze.models.sources`: built-in names, local folders, ``.gguf`` files, hub ids;
- :mod:`~squeeze.models.checks`: safetensors and GGUF header checks, in seconds;
- :mod:`~squeeze.models.weights`: weights from files (GGUF dequantized, checkpoints through their
  format's reader) and back;
- :mod:`~squeeze.models.load`: a model on a device for a pass, or on the meta device for checks;
- :mod:`~squeeze.models.output`: atomic output folders;
- :mod:`~squeeze.models.inspect`: sizes and memory estimates from the config alone.
"""

from squeeze.models.inspect import inspect_model
from squeeze.models.load import (
    LoadedModel,
    is_quantized_folder,
    is_sparse_folder,
    load_model,
    load_tokenizer,
    meta_model,
    stored_dtype,
)
from squeeze.models.output import atomic_output_dir, check_output_dir, publish_dir
from squeeze.models.sources import BUILTIN_MODELS, KIND_NAMES, ModelKind, ModelSource, resolve_model
from squeeze.models.weights import save_model

__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "KIND_NAMES",
    "ModelKind",
    "ModelSource",
    "atomic_output_dir",
    "check_output_dir",
    "inspect_model",
    "is_quantized_folder",
    "is_sparse_folder",
    "load_model",
    "load_tokenizer",
    "meta_model",
    "publish_dir",
    "resolve_model",
    "save_model",
    "stored_dtype",
]
