"""Writing one safetensors file so that every layer above sees the same errors as from any write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def save_tensors_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, readable by everyone like any other file of the checkpoint. A full
    disk raises OSError(ENOSPC), as any other write does (safetensors says it in its own error)."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        if not any(words in str(exc) for words in ("No space left on device", f"(os error {errno.ENOSPC})")):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
    # safetensors creates the file private (0600); a checkpoint is meant to be shared like any file
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
