"""Output folders that appear whole or not at all: a pass writes into a staging folder beside the
output and renames it into place at the end, so an interrupted run leaves nothing behind."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from squeeze.errors import SqueezeError


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
