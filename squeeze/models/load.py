"""Load a resolved model for a pass: weights and tokenizer on a device, or only its modules on the
meta device (shapes and names, no weights) for the cheap checks that run before any loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from squeeze.errors import SqueezeError
from squeeze.formats import PRUNED_FORMATS, QUANTIZED_FORMATS
from squeeze.formats.files import auto_class, read_config
from squeeze.linears import as_linear_layers
from squeeze.models.checks import check_safetensors_folder, one_line
from squeeze.models.shapes import check_fits_weights
from squeeze.models.sources import ModelSource, Progress, resolve_model
from squeeze.models.weights import quiet_progress_bars, read_model, read_tokenizer


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, no gradients, on the requested device and dtype."""

    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    source: ModelSource
    config: transformers.PretrainedConfig
    stored_dtype: torch.dtype = torch.float32  # the floating dtype the source checkpoint stores


def load_model(
    source: ModelSource | str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Progress = None,
) -> LoadedModel:
    """Load weights (safetensors or GGUF only) and tokenizer; the model is in eval mode, frozen.

    ``device`` is "cpu", "cuda", "cuda:N" or "auto" (cuda when available). A GGUF file is
    dequantized to fp32 and rebuilt as an ordinary model, so it saves like any HF model; a
    checkpoint squeeze wrote is read by its format's reader (see :func:`read_model`). A folder's
    config.json is held against its weights first (see :func:`meta_model`), so a config the weights
    do not fit is one SqueezeError, not an allocation of the sizes it claims.
    """
    target_device = _pick_device(device)  # before resolving: a built-in may first take a minute to convert
    if isinstance(source, str):
        source = resolve_model(source, progress=progress)
    if not source.is_gguf:
        meta_model(source)  # config.json held against the weights before a byte is allocated
    model, tokenizer = read_model(source.path, source.kind, dtype, source.trust_remote_code, source.spec)
    model = model.to(device=target_device)
    return LoadedModel(model, tokenizer, source, model.config, stored_dtype(source))


def load_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer alone (seconds), e.g. to cut prompts before any model is loaded."""
    return read_tokenizer(source.path, source.trust_remote_code)


def stored_dtype(source: ModelSource) -> torch.dtype:
    """The dtype a folder's config says its weights are stored in; GGUF dequantizes to float32."""
    if source.is_gguf:
        return torch.float32
    config = read_config(source.path)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def meta_model(source: ModelSource) -> torch.nn.Module:
    """The model's modules built from its config on the meta device: shapes and names, no weights.

    Cheap (no weight is read), so passes validate their plan against it before loading. A folder's
    config.json is first held against its weights' safetensors headers (sizes in range, shapes
    and block count as stored: squeeze.models.shapes), so a wrong config fails here in one line
    instead of allocating. ``Conv1D`` layers are Linear layers here, as in a loaded model
    (squeeze.linears).
    """
    if source.is_gguf:
        with quiet_progress_bars():
            config = transformers.AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        model = _build(config, source)
    else:
        tensors = check_safetensors_folder(source.path, source.spec)  # config.json's sizes too
        config = _read_config(source)
        model = _build(config, source)
        check_fits_weights(model, read_config(source.path), tensors, source.spec, lambda changed: _build(changed, source))
    as_linear_layers(model)
    return model


def _read_config(source: ModelSource) -> transformers.PretrainedConfig:
    try:
        with quiet_progress_bars():
            config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # transformers' checks of a config (and a model's own config code) raise anything
        raise SqueezeError(f"cannot read the config.json of model {source.spec}: {one_line(exc)}") from exc
    return config


def _build(config: transformers.PretrainedConfig, source: ModelSource) -> torch.nn.Module:
    """The model of ``config`` on the meta device, without its quantization (squeeze's readers
    and the checks want the plain modules)."""
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"):
            return auto_class(source.kind).from_config(config, trust_remote_code=source.trust_remote_code)
    except Exception as exc:  # a config transformers (or a model's own code) cannot build raises anything
        raise SqueezeError(f"cannot build model {source.spec} from its config.json: {one_line(exc)}") from exc


def is_sparse_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a sparse-bitmask checkpoint (squeeze prune's default format)."""
    return PRUNED_FORMATS.get("sparse-bitmask").recognises(folder)


def is_quantized_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a compressed-tensors integer checkpoint (squeeze quantize's default format)."""
    return QUANTIZED_FORMATS.get("compressed-tensors").recognises(folder)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise SqueezeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise SqueezeError(f"device {device} requested but CUDA is not available; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise SqueezeError(f"device {device} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif chosen.type != "cpu":
        raise SqueezeError(f"device {device} is not supported; use cpu, cuda, cuda:N or auto")
    return chosen
