"""Model weights from files and back: GGUF files (dequantized), safetensors folders (through their
checkpoint format's reader where squeeze reads the format back), and ``save_model``.

Weights are only ever read from safetensors or GGUF; squeeze never unpickles ``.bin`` files. This
module prints nothing: the progress bars of transformers and huggingface_hub are silenced.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub.utils as hub_utils
import torch
import transformers
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from squeeze.errors import SqueezeError
from squeeze.formats import recognise
from squeeze.formats.files import auto_class
from squeeze.linears import as_linear_layers
from squeeze.models.checks import first_line


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a ``.gguf`` file."""
    return path.is_file() and path.suffix == ".gguf"


def read_model(
    path: Path, kind: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, spec: str | None = None,
) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """The model stored at ``path`` (a GGUF file or a safetensors folder) and its tokenizer: in eval
    mode, no gradients, in ``dtype``, on the CPU; the tokenizer pads with its end-of-text token when
    it has no pad token. ``spec`` names the model in errors.

    A GGUF file is dequantized to fp32 and rebuilt as an ordinary model, so it saves like any HF
    model. ``Conv1D`` layers come back as Linear layers (squeeze.linears). A folder whose checkpoint format squeeze reads back (compressed-tensors integer,
    sparse-bitmask) goes through that format's reader, so the layers compute exactly what the pass
    evaluated; any other folder through ``from_pretrained``.
    """
    with quiet_progress_bars():
        if is_gguf(path):
            model = load_gguf_model(path)
        else:
            try:
                fmt = recognise(path)
                if fmt is not None:
                    model = fmt.read(path, kind, dtype, trust_remote_code)
                else:
                    model = auto_class(kind).from_pretrained(
                        path, use_safetensors=True, dtype=dtype, trust_remote_code=trust_remote_code
                    )
            except (OSError, ValueError) as exc:
                raise SqueezeError(f"cannot load model {spec or path}: {first_line(exc)}") from exc
        tokenizer = read_tokenizer(path, trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    as_linear_layers(model)
    if not getattr(model, "is_quantized", False):  # transformers' quantized layers (GPTQ, bitsandbytes) keep their dtypes
        model = model.to(dtype=dtype)
    model = model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def read_tokenizer(path: Path, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer stored with the model at ``path`` (a GGUF file or a model folder)."""
    with quiet_progress_bars():
        if is_gguf(path):
            return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_gguf_model(path: Path) -> torch.nn.Module:
    """Dequantize a GGUF file and move its weights into a plain model built from the config.

    transformers marks a GGUF-loaded model as quantized (config.quantization_config), which blocks a
    normal save; rebuilding on the meta device and assigning the tensors costs no copy.
    """
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take them from the loaded model.
    old_buffers = dict(loaded.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = old_buffers[name]
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"GGUF state dict left parameters unset: {still_meta[:5]}")
    return model


def save_model(model: torch.nn.Module, tokenizer: transformers.PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Write model (safetensors) and tokenizer into ``out_dir`` with save_pretrained."""
    out_dir = Path(out_dir)
    with quiet_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence the tqdm bars of transformers and huggingface_hub while the block runs."""
    hf_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_off = hub_utils.are_progress_bars_disabled()
    gguf_tqdm = gguf_utils.tqdm  # the GGUF loader calls tqdm directly, outside transformers' switch
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            hub_utils.enable_progress_bars()
