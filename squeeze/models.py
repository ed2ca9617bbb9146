"""Load and save models: local HF folders, hub ids, GGUF files and the built-in names.

Every way in goes through :func:`resolve_model`, which checks the input in seconds (paths exist,
safetensors headers are whole, GGUF files open) so that a bad input fails before any long work.
Weights are only ever read from safetensors or GGUF; squeeze never unpickles ``.bin`` files.
Outputs are written through :func:`atomic_output_dir`, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from squeeze.calib.blocks import find_blocks
from squeeze.errors import SqueezeError
from squeeze.packages import MINILM, SMOLLM2, PackageData, cache_dir

ModelKind = Literal["causal", "encoder"]
Progress = Callable[[str], None] | None

BUILTIN_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Llama, 135M), from a Q4_1 GGUF dequantized to fp32",
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 22.7M)",
}


@dataclass(frozen=True)
class _Builtin:
    package: PackageData
    gguf_file: str | None  # file inside the package root; None when the root is a HF folder
    display_name: str


_BUILTINS: dict[str, _Builtin] = {
    "smollm2": _Builtin(SMOLLM2, "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    "minilm": _Builtin(MINILM, None, "all-MiniLM-L6-v2"),
}

# Model types whose checkpoints are bidirectional encoders (embedding models), loaded with AutoModel.
_ENCODER_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "distilbert",
        "xlm-roberta",
        "xlm-roberta-xl",
        "mpnet",
        "electra",
        "albert",
        "camembert",
        "deberta",
        "deberta-v2",
        "modernbert",
        "nomic_bert",
        "new",
    }
)

# Files worth fetching from the hub: weights as safetensors only, never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]

# Bytes per element of the safetensors dtypes; used to check that each tensor's byte range fits its shape.
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; the format's own limit


@dataclass(frozen=True)
class ModelSource:
    """A validated model input: where its files are and what kind of model it is."""

    spec: str  # what the user typed
    path: Path  # HF folder (config.json + *.safetensors + tokenizer) or a .gguf file
    kind: ModelKind
    name: str  # short display name
    trust_remote_code: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.path.is_file() and self.path.suffix == ".gguf"


@dataclass
class LoadedModel:
    """A model ready for inference: eval mode, no gradients, on the requested device and dtype."""

    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    source: ModelSource
    config: transformers.PretrainedConfig
    stored_dtype: torch.dtype = torch.float32  # the floating dtype the source checkpoint stores


def stored_dtype(source: ModelSource) -> torch.dtype:
    """The dtype a folder's config says its weights are stored in; GGUF dequantizes to float32."""
    if source.is_gguf:
        return torch.float32
    config = _read_config_json(source.path)
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ---------------------------------------------------------------------------------------------
# resolve


def resolve_model(spec: str, trust_remote_code: bool = False, progress: Progress = None) -> ModelSource:
    """Turn what the user typed into a validated :class:`ModelSource`, quickly.

    ``spec`` is a built-in name (see ``BUILTIN_MODELS``), a local folder, a ``.gguf`` file or a
    hub id ``org/name``. Raises SqueezeError with one actionable line when the input cannot work.
    A built-in model is converted into the cache on first use (tens of seconds), then reused.
    """
    if spec in _BUILTINS:
        return _resolve_builtin(spec, progress)
    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local(spec, path, trust_remote_code)
    if _looks_like_hub_id(spec):
        return _resolve_local(spec, _download_from_hub(spec, trust_remote_code), trust_remote_code, name=spec)
    raise SqueezeError(f"model path {spec} does not exist (built-in models: {', '.join(BUILTIN_MODELS)})")


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and ".." not in spec


def _resolve_local(spec: str, path: Path, trust_remote_code: bool, name: str | None = None) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise SqueezeError(f"model path {spec} is a file but not a .gguf; give a model folder or a .gguf file")
        _check_gguf(path)
        return ModelSource(spec, path, "causal", name or path.stem, trust_remote_code)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_local(spec, ggufs[0], trust_remote_code, name)
        raise SqueezeError(f"model folder {spec} has no config.json; is it a Hugging Face model folder?")
    _check_safetensors_folder(path, spec)
    config = _read_config_json(path)
    kind = _kind_from_config(config, spec, trust_remote_code)
    return ModelSource(spec, path, kind, name or path.resolve().name, trust_remote_code)


def _read_config_json(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SqueezeError(f"cannot read {folder / 'config.json'}: {exc}") from exc


def _kind_from_config(config: dict[str, Any], spec: str, trust_remote_code: bool) -> ModelKind:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal"
    if model_type in _ENCODER_TYPES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    if config.get("auto_map") and not trust_remote_code:
        raise SqueezeError(
            f"model {spec} needs its own Python code (model_type {model_type!r}); "
            "pass --trust-remote-code only if you trust its authors"
        )
    if config.get("auto_map"):
        return "causal" if "AutoModelForCausalLM" in config["auto_map"] else "encoder"
    raise SqueezeError(
        f"model {spec} has model_type {model_type!r} ({', '.join(architectures) or 'no architectures'}), "
        "which squeeze does not support; it handles decoder-only causal LMs and BERT-like encoders"
    )


def _download_from_hub(repo_id: str, trust_remote_code: bool) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        with _quiet_progress_bars():
            folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
    except hub_errors.GatedRepoError as exc:
        raise SqueezeError(f"cannot download {repo_id}: the repo is gated; accept its terms and log in (hf auth login)") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise SqueezeError(f"cannot download {repo_id}: no such model on the Hugging Face hub (or it is private)") from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise SqueezeError(f"cannot download {repo_id}: {_first_line(exc)}") from exc
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as exc:
        raise SqueezeError(
            f"cannot download {repo_id}: the Hugging Face hub is unreachable ({_first_line(exc)}), "
            "and there is no local folder of that name"
        ) from exc
    except hub_errors.HfHubHTTPError as exc:
        raise SqueezeError(f"cannot download {repo_id}: {_first_line(exc)}") from exc
    folder = Path(folder)
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        raise SqueezeError(
            f"hub model {repo_id} ships no .safetensors weights; squeeze never loads .bin pickle files"
        )
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_safetensors_folder(folder: Path, spec: str) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(pickles[:3])}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
        raise SqueezeError(f"model folder {spec} has no *.safetensors weights{hint}")
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise SqueezeError(f"file {index} is not a valid safetensors index: {exc}") from exc
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise SqueezeError(f"model folder {spec} is incomplete: {index.name} lists missing shard {missing[0]}")
    for file in files:
        _check_safetensors_file(file)


def _check_safetensors_file(file: Path) -> None:
    """Check a safetensors file's header and size without reading its tensors.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data; every tensor's
    ``data_offsets`` lie inside the data and the file ends exactly at the last one.
    """

    def corrupt(why: str) -> SqueezeError:
        return SqueezeError(f"file {file} is truncated or corrupt: {why}")

    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise corrupt(f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise corrupt(f"header claims {header_len} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise corrupt(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_size = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            dtype = info["dtype"]
        except (TypeError, KeyError, ValueError) as exc:
            raise corrupt(f"bad header entry for tensor {name}") from exc
        if not 0 <= begin <= end <= data_size:
            raise corrupt(f"tensor {name} spans bytes {begin}..{end} but the data holds {data_size}")
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != numel * width:
            raise corrupt(f"tensor {name} has {end - begin} bytes for {numel} {dtype} values")
        end_max = max(end_max, end)
    if end_max != data_size:
        raise corrupt(f"data holds {data_size} bytes but the tensors need {end_max}")


def _check_gguf(file: Path) -> None:
    with file.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise SqueezeError(f"file {file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    import gguf

    try:
        reader = gguf.GGUFReader(file)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on a bad file
        raise SqueezeError(f"file {file} is truncated or corrupt: {_first_line(exc)}") from exc
    field = reader.fields.get("general.architecture")
    architecture = str(field.contents()) if field is not None else "unknown"
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SqueezeError(f"GGUF file {file} has architecture {architecture!r}, which transformers cannot load")


def _resolve_builtin(name: str, progress: Progress) -> ModelSource:
    builtin = _BUILTINS[name]
    target = cache_dir() / "models" / name
    kind: ModelKind = "causal" if builtin.gguf_file else "encoder"
    if not _cache_is_complete(target):
        _convert_builtin(name, builtin, kind, target, progress)
    return ModelSource(name, target, kind, builtin.display_name)


def _cache_is_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        _check_safetensors_folder(folder, str(folder))
    except SqueezeError:
        return False
    return True


def _convert_builtin(name: str, builtin: _Builtin, kind: ModelKind, target: Path, progress: Progress) -> None:
    """Load a built-in model from its package once and save it as a plain HF folder in the cache."""
    if progress:
        progress(f"converting built-in model {name} into {target} (once)")
    root = builtin.package.root()
    path = root / builtin.gguf_file if builtin.gguf_file else root
    loaded = load_model(ModelSource(name, path, kind, builtin.display_name))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an incomplete cache from an older, broken run
        shutil.rmtree(target)
    staging = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    try:
        save_model(loaded.model, loaded.tokenizer, staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _cache_is_complete(target):
            raise
        # else another process finished the same conversion first: use its copy
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# load and save


def load_model(
    source: ModelSource | str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Progress = None,
) -> LoadedModel:
    """Load weights (safetensors or GGUF only) and tokenizer; the model is in eval mode, frozen.

    ``device`` is "cpu", "cuda", "cuda:N" or "auto" (cuda when available). A GGUF file is
    dequantized to fp32 and rebuilt as an ordinary model, so it saves like any HF model.
    """
    target_device = _pick_device(device)  # before resolving: a built-in may first take a minute to convert
    if isinstance(source, str):
        source = resolve_model(source, progress=progress)
    trust = source.trust_remote_code
    with _quiet_progress_bars():
        if source.is_gguf:
            model = _load_gguf_model(source.path)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        else:
            auto = transformers.AutoModelForCausalLM if source.kind == "causal" else transformers.AutoModel
            try:
                if is_sparse_folder(source.path):
                    model = _load_sparse_bitmask(source.path, auto, dtype, trust)
                elif is_quantized_folder(source.path):
                    from squeeze.runtime import load_quantized

                    # squeeze's own reader: the layers compute exactly what the pass evaluated
                    model = load_quantized(source.path, source.kind, dtype, trust)
                else:
                    model = auto.from_pretrained(source.path, use_safetensors=True, dtype=dtype, trust_remote_code=trust)
            except (OSError, ValueError) as exc:
                raise SqueezeError(f"cannot load model {source.spec}: {_first_line(exc)}") from exc
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=target_device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, model.config, stored_dtype(source))


def is_sparse_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a sparse-bitmask checkpoint (squeeze prune's default format)."""
    from squeeze.formats.sparse import is_sparse_bitmask

    return folder.is_dir() and is_sparse_bitmask(_read_config_json(folder))


def load_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer alone (seconds), e.g. to cut prompts before any model is loaded."""
    with _quiet_progress_bars():
        if source.is_gguf:
            return transformers.AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
        return transformers.AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)


def is_quantized_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a compressed-tensors integer checkpoint (squeeze quantize's default format)."""
    if not folder.is_dir():
        return False
    qc = _read_config_json(folder).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and bool(qc.get("config_groups"))


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (shards merged), on the CPU."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _load_sparse_bitmask(folder: Path, auto, dtype: torch.dtype, trust: bool) -> torch.nn.Module:
    """A sparse-bitmask checkpoint (squeeze prune's default), decoded to dense weights with zeros:
    transformers 5 no longer decompresses sparse checkpoints itself."""
    from squeeze.formats.sparse import decode_bitmask_state

    state = decode_bitmask_state(read_safetensors_folder(folder))
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    model = auto.from_config(config, dtype=dtype, trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    # tied copies (lm_head = embeddings) are not stored; buffers a config rebuilds need not be either
    distinct = {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k in distinct]
    if missing or unexpected:
        raise SqueezeError(
            f"sparse checkpoint {folder} does not match its config: "
            + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}")
        )
    return model


def _load_gguf_model(path: Path) -> torch.nn.Module:
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


def save_model(model: torch.nn.Module, tokenizer: transformers.PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Write model (safetensors) and tokenizer into ``out_dir`` with save_pretrained."""
    out_dir = Path(out_dir)
    with _quiet_progress_bars():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """This module prints nothing: silence the tqdm bars of transformers and huggingface_hub."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

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


# ---------------------------------------------------------------------------------------------
# output directories


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Fail early, before long work, if ``out`` cannot become the output directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SqueezeError(f"output path {out} exists and is a file, not a directory")
    if out.exists() and not overwrite:
        raise SqueezeError(f"output directory {out} already exists; pass --overwrite to replace it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SqueezeError(f"cannot write the output directory {out}: {parent} is not writable")


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    On any exception, KeyboardInterrupt included, the temporary folder is deleted and the
    exception re-raised, so no partial output remains. With ``overwrite`` an existing ``out``
    is moved aside, replaced, then deleted.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        publish_dir(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder ``staging`` to ``out``. With ``overwrite`` an existing ``out`` is
    moved aside, replaced, then deleted (and put back if the rename fails)."""
    if not out.exists():
        staging.rename(out)
        return
    if not overwrite:
        raise SqueezeError(f"output directory {out} appeared while working; pass --overwrite to replace it")
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# inspect


def meta_model(source: ModelSource) -> torch.nn.Module:
    """The model's modules built from its config on the meta device: shapes and names, no weights.

    Cheap (no weight is read), so passes validate their plan against it before loading.
    """
    with _quiet_progress_bars():
        if source.is_gguf:
            config = transformers.AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
        else:
            config = transformers.AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    auto = transformers.AutoModelForCausalLM if source.kind == "causal" else transformers.AutoModel
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=source.trust_remote_code)


def inspect_model(source: ModelSource | str) -> dict[str, Any]:
    """Describe a model from its config alone (built on the meta device; no weights are read).

    Parameter counts are of unique tensors (tied embeddings count once). ``params_quantizable``
    is the weights of the nn.Linear layers inside the repeated blocks, the ones quantization
    passes touch; ``params_embedding`` is the nn.Embedding weights. Memory, in bytes, for the
    weights only: fp32 = 4 B and bf16 = 2 B per parameter; int8 / int4 = the quantizable weights
    at 1 B / 0.5 B each plus everything else (embeddings, norms, biases, heads) at bf16.
    Quantization scales and zero points are ignored (about 1 % at group size 128).
    """
    if isinstance(source, str):
        source = resolve_model(source)
    model = meta_model(source)
    config = model.config
    params_total = sum(p.numel() for p in model.parameters())
    blocks = find_blocks(model, getattr(config, "num_hidden_layers", None))
    params_quantizable = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and blocks is not None and name.startswith(blocks + ".")
    )
    params_embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    params_other = params_total - params_quantizable
    return {
        "name": source.name,
        "kind": source.kind,
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "params_total": params_total,
        "params_quantizable": params_quantizable,
        "params_embedding": params_embedding,
        "bytes_fp32": 4 * params_total,
        "bytes_bf16": 2 * params_total,
        "bytes_int8": params_quantizable + 2 * params_other,
        "bytes_int4": (params_quantizable + 1) // 2 + 2 * params_other,
    }


__all__ = [
    "BUILTIN_MODELS",
    "LoadedModel",
    "ModelKind",
    "ModelSource",
    "atomic_output_dir",
    "check_output_dir",
    "find_blocks",
    "inspect_model",
    "load_model",
    "meta_model",
    "resolve_model",
    "save_model",
]
