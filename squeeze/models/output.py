"""Output folders that appear whole or not at all: a pass writes into a staging folder beside the
output and renames it into place at the end, so an interrupted run leaves nothing behind.

A process killed outright (kill -9, a crash, a lost machine) cannot clean up after itself, so a
staging folder's name records its owner (pid, start time, host) and the next run for the same
output removes the folders whose owner is gone. The output is checked before any long work: it
may not be or hold the current directory or the home directory, be the filesystem root, or hold
an input model or sit inside one, and its disk must have room for it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from squeeze.errors import OptionError, SqueezeError, literal
from squeeze.sizes import in_gib

STAGING, ASIDE = "partial", "old"  # a folder being written; an output moved aside while replaced
START_TOLERANCE_S = 2  # the boot time a start time is counted from can move by a second


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Owner:
    """The process a staging folder belongs to: its pid, when it started (seconds since the
    epoch, so a reused pid is told apart) and a hash of its host's name (an output folder on a
    shared disk may be written from another machine, whose processes cannot be seen)."""

    pid: int
    started: int
    host: str

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), int(psutil.Process().create_time()), _host())

    @property
    def tag(self) -> str:
        return f"{self.pid}-{self.started}-{self.host}"

    @classmethod
    def parse(cls, tag: str) -> Owner | None:
        """The owner named by ``tag`` (as :attr:`tag` writes it, maybe followed by ``-suffix``); None if it names none."""
        parts = tag.split("-")
        if len(parts) < 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            return None
        return cls(int(parts[0]), int(parts[1]), parts[2])

    def is_gone(self) -> bool:
        """Whether this process has ended: no process has its pid, or the one that has is a zombie
        or started at another time (the pid was reused). Another host's process is never gone."""
        if self.host != _host():
            return False
        try:
            process = psutil.Process(self.pid)
            return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - self.started) > START_TOLERANCE_S
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False


def beside(out: Path, kind: str, owner: Owner | None = None) -> Path:
    """A new folder name next to ``out`` for ``kind`` (``STAGING`` or ``ASIDE``), owned by ``owner`` (default: this process)."""
    owner = owner or Owner.this_process()
    return out.parent / f".{out.name}.{kind}-{owner.tag}-{secrets.token_hex(3)}"


def _owned(out: Path, kind: str) -> Iterator[tuple[Path, Owner | None]]:
    """The folders of ``kind`` next to ``out`` and their owners (None where a name records none,
    e.g. one left by an older squeeze)."""
    parent, prefix = out.absolute().parent, f".{out.name}.{kind}-"
    try:
        found = sorted(parent.iterdir())
    except OSError:  # missing or unreadable: the checks that follow say so
        return
    for folder in found:
        if folder.name.startswith(prefix) and folder.is_dir() and not folder.is_symlink():
            yield folder, Owner.parse(folder.name[len(prefix):])


def sweep_stale(out: Path) -> list[Path]:
    """Remove the staging folders next to ``out`` whose owner is gone, and the outputs they moved
    aside; an output moved aside when ``out`` is missing (the owner died between the two renames
    of :func:`publish_dir`) is put back instead. Folders of live processes, of other hosts, or
    with no owner in their name are left alone. Returns the folders removed."""
    out = Path(out)
    removed = []
    for kind in (ASIDE, STAGING):
        for folder, owner in _owned(out, kind):
            if owner is None or not owner.is_gone():
                continue
            if kind == ASIDE and not out.exists() and not out.is_symlink():
                try:
                    folder.rename(out)
                except OSError:
                    pass  # left for the user to look at: it holds their previous output
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _refuse_place(out: Path, inputs: Iterable[Path]) -> None:
    """OptionError when replacing ``out`` would delete what the run stands on: the current
    directory, the filesystem root, the home directory, or an input model."""
    where = out.resolve()
    cwd = Path.cwd().resolve()
    shown = literal(out)
    if where == Path(where.anchor):
        raise OptionError(f"{{0}} {shown} is the filesystem root; give the output a folder of its own", "out")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        home = None
    if home is not None and (where == home or where in home.parents):
        what = "is the home directory" if where == home else f"holds the home directory {literal(home)}"
        raise OptionError(f"{{0}} {shown} {what}; give the output a folder of its own", "out")
    if cwd == where or where in cwd.parents:
        what = "is the current directory" if cwd == where else f"holds the current directory {literal(cwd)}"
        raise OptionError(f"{{0}} {shown} {what}: replacing it would delete the folder squeeze runs in; give a new folder", "out")
    for path in inputs:
        model = Path(path).resolve()
        if where == model or where in model.parents:
            what = "is the input model" if where == model else f"holds the input model {literal(path)}"
        elif model in where.parents:
            what = f"is inside the input model's folder {literal(path)}"
        else:
            continue
        raise OptionError(f"{{0}} {shown} {what}; write the output to a folder of its own", "out")


def _existing_parent(out: Path) -> Path:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def local_inputs(*specs: str | None) -> list[Path]:
    """The model arguments among ``specs`` that name files or folders here (not built-in names or
    hub ids): what an output may neither hold nor sit inside."""
    paths = [Path(spec).expanduser() for spec in specs if spec]
    return [path for path in paths if path.exists()]


def check_output_dir(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail early, before long work, if ``out`` cannot become the output directory; ``inputs``
    are the input models' files or folders, which ``out`` may neither hold nor sit inside.

    Also removes the folders that runs killed while writing ``out`` left next to it (see :func:`sweep_stale`)."""
    out = Path(out)
    _refuse_place(out, inputs)
    sweep_stale(out)
    if out.exists() and not out.is_dir():
        raise SqueezeError(f"output path {out} exists and is a file, not a directory")
    if out.exists() and not overwrite:
        raise SqueezeError(f"output directory {out} already exists; pass --overwrite to replace it")
    parent = _existing_parent(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SqueezeError(f"cannot write the output directory {out}: {parent} is not writable")


def check_disk_space(out: Path, needed: int) -> None:
    """OptionError when the disk ``out`` goes on has fewer than ``needed`` bytes free."""
    parent = _existing_parent(Path(out))
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OptionError(
            f"{{0}} {literal(out)} needs at least {in_gib(needed)} but {literal(parent)} has {in_gib(free)} free; "
            "free up space or write elsewhere with {0}", "out",
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full (formats.files turns safetensors' own error into an OSError)."""
    return isinstance(error, OSError) and error.errno == errno.ENOSPC


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    On any exception, KeyboardInterrupt included, the temporary folder is deleted and the
    exception re-raised, so no partial output remains; a full disk becomes one OptionError
    saying how much is free. With ``overwrite`` an existing ``out`` is moved aside, replaced,
    then deleted.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = beside(out, STAGING)
    staging.mkdir()
    try:
        yield staging
        publish_dir(staging, out, overwrite)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_disk_full(exc):
            raise
        # what is free once the unfinished output is removed is what the output did not fit in
        parent = out.absolute().parent
        raise OptionError(
            f"the disk of {literal(parent)} filled up while writing {{0}} {literal(out)}: the output needs more than the "
            f"{in_gib(shutil.disk_usage(parent).free)} free there; free up space or write elsewhere", "out",
        ) from exc


def keep_finished(staging: Path, marker: str, keep: Callable[[Path], bool] = lambda item: False) -> None:
    """After a failed or interrupted run: drop every item of ``staging`` that neither holds the
    file ``marker`` (a finished part) nor passes ``keep``; drop ``staging`` when nothing is left."""
    for item in staging.iterdir():
        if not ((item / marker).is_file() or keep(item)):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    if not any(staging.iterdir()):
        staging.rmdir()


def publish_dir(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder ``staging`` to ``out``. With ``overwrite`` an existing ``out`` is
    moved aside, replaced, then deleted (and put back if the rename fails)."""
    if not out.exists():
        staging.rename(out)
        return
    if not overwrite:
        raise SqueezeError(f"output directory {out} appeared while working; pass --overwrite to replace it")
    old = beside(out, ASIDE)
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
