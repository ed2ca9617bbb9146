"""Training checkpoints: safetensors and JSON only (nothing pickled), written atomically.

A checkpoint is a folder ``step-NNNNNNN`` inside the checkpoint directory holding the trained
weights, the optimizer's moments, each process's random-number state and ``state.json``. It is
written under a temporary name and renamed into place when complete, so a run killed mid-write
leaves either the previous checkpoint or the new one, never half of one; leftovers of a killed
write are removed on the next start. ``run.json`` beside the checkpoints records the settings the
run was started with; a resume with other settings is refused. A resume reads the newest
checkpoint whose files are all whole (safetensors headers readable, sizes as the headers say, JSON
parsed); a damaged one is skipped with a note, and when none is whole the resume is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from squeeze.errors import OptionError, SqueezeError, literal

RUN_FILE = "run.json"
STATE_FILE = "state.json"  # written last: a folder without it is incomplete
_STEP_DIR = re.compile(r"^step-(\d{7})$")
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_LOADING_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError)  # what a damaged file raises when read

log = logging.getLogger("squeeze")


def default_checkpoint_dir(out: Path) -> Path:
    """``OUT.checkpoints`` beside the output directory ``OUT``."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoints"


@dataclass
class TrainingState:
    """Where a run stands after ``step`` optimizer steps."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)  # one entry per step (loss terms, lr, grad norm, eval)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds, "curve": self.curve}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(file))
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict as flat tensors ``"<param index>.<name>"`` plus JSON for the groups."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, entries in state["state"].items() for name, value in entries.items()}
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = value
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _is_ours(name: str) -> bool:
    """A checkpoint folder, published (``step-NNNNNNN``) or being written (``.step-...``)."""
    return bool(_STEP_DIR.match(name)) or name.startswith(".step-")


def safetensors_damage(file: Path) -> str | None:
    """What is wrong with a safetensors file, or None when its header reads and its size is the one
    the header describes (a truncated or overwritten file fails one or the other)."""
    if not file.is_file():
        return f"{file.name} is missing"
    size = file.stat().st_size
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8:
            return f"{file.name} is cut short ({size:,} bytes)"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, stop = entry["data_offsets"]
            if stop - begin != math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]] or begin < 0:
                return f"{file.name}: the header's tensor {name} does not fit its place"
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{file.name} has an unreadable header"
    expected = 8 + length + end
    if size < expected:
        return f"{file.name} is cut short ({size:,} of {expected:,} bytes)"
    if size > expected:
        return f"{file.name} has {size - expected:,} bytes more than its header describes"
    return None


def _json_damage(file: Path, keys: tuple[str, ...]) -> str | None:
    if not file.is_file():
        return f"{file.name} is missing"
    try:
        value = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{file.name} is not valid JSON"
    if not isinstance(value, dict) or any(key not in value for key in keys):
        return f"{file.name} lacks {', '.join(keys)}"
    return None


def checkpoint_damage(folder: Path, processes: int = 1) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file it needs reads whole.
    ``processes``: how many processes' random states it must hold."""
    needed = ["weights.safetensors", "optimizer.safetensors"] + [f"rng-rank{rank}.safetensors" for rank in range(processes)]
    files = dict.fromkeys(needed + sorted(p.name for p in folder.glob("*.safetensors")))
    for name in files:
        problem = safetensors_damage(folder / name)
        if problem:
            return problem
    return _json_damage(folder / STATE_FILE, ("step", "tokens", "train_seconds", "curve")) or _json_damage(
        folder / "optimizer.json", ("param_groups",)
    )


class CheckpointDir:
    """The checkpoints of one run; only process 0 writes the shared parts. ``notes`` says which
    damaged checkpoints a resume skipped (for the report)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.notes: list[str] = []

    def complete(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest checkpoint whose files read whole (None when there is none); newer damaged
        ones are noted and skipped. SqueezeError when there are checkpoints but none is whole."""
        return self._intact(lambda folder: folder)

    def load_latest(self, rank: int) -> tuple[Path, tuple] | None:
        """The newest whole checkpoint and what :meth:`load` reads from it; one that passes the
        checks but fails to load is noted and skipped like a damaged one."""

        def load(folder: Path) -> tuple[Path, tuple]:
            return folder, self.load(folder, rank)

        return self._intact(load)

    def _intact(self, use: Callable[[Path], Any]) -> Any:
        """``use`` of the newest checkpoint that is whole and that ``use`` reads without a loading error."""
        skipped: list[tuple[str, str]] = []
        run = self.read_run() or {}
        for folder in reversed(self.complete()):
            problem = checkpoint_damage(folder, int(run.get("processes", 1)))
            if problem is None:
                try:
                    found = use(folder)
                except _LOADING_ERRORS as exc:
                    problem = "it does not load: " + " ".join(str(exc).split())
                else:
                    for name, why in skipped:
                        self._note(f"checkpoint {name} is damaged: {why}; resumed from {folder.name} instead")
                    return found
            skipped.append((folder.name, problem))
        if skipped:
            damaged = "; ".join(f"{name}: {why}" for name, why in skipped)
            raise OptionError(
                f"no checkpoint in {literal(self.path)} is whole ({literal(damaged)}); rerun with {{0}} instead of {{1}} to start over",
                "overwrite", "resume",
            )
        return None

    def _note(self, note: str) -> None:
        if note not in self.notes:  # the pass and the trainer both look for the newest checkpoint
            self.notes.append(note)
            log.warning(note)

    def holds_run(self) -> bool:
        """Whether the folder holds anything of a run (its settings or a checkpoint, whole or partial)."""
        return self.path.is_dir() and any(p.name == RUN_FILE or _is_ours(p.name) for p in self.path.iterdir())

    def clear(self) -> None:
        """Remove what runs wrote here (and the folder, once empty); anything else is left alone,
        so ``--checkpoint-dir`` may point at a folder that holds other files."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name == RUN_FILE or p.name.startswith(f".{RUN_FILE}."):
                p.unlink(missing_ok=True)
            elif _is_ours(p.name):
                shutil.rmtree(p, ignore_errors=True)
        if not any(self.path.iterdir()):
            self.path.rmdir()

    def remove_partial(self) -> None:
        """Folders a killed write left behind."""
        if self.path.is_dir():
            for p in self.path.iterdir():
                if p.name.startswith(".step-"):
                    shutil.rmtree(p, ignore_errors=True)

    def read_run(self) -> dict[str, Any] | None:
        file = self.path / RUN_FILE
        if not file.is_file():
            return None
        try:
            run = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            run = None
        if not isinstance(run, dict):
            raise OptionError(f"{literal(file)} is damaged (not the JSON a run writes); rerun with {{0}} to start over", "overwrite")
        return run

    def start(self, run: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{RUN_FILE}.{secrets.token_hex(4)}"
        tmp.write_text(json.dumps(run, indent=2) + "\n")
        tmp.replace(self.path / RUN_FILE)

    def check_resumable(self, run: dict[str, Any]) -> None:
        """SqueezeError naming the first settings that differ from the ones the checkpoints were made with."""
        old = self.read_run()
        if old is None:
            raise SqueezeError(f"{self.path} holds no distillation run to resume (no {RUN_FILE})")
        differ = [key for key in sorted(set(old) | set(run)) if old.get(key) != run.get(key)]
        if differ:
            shown = "; ".join(f"{k}: {old.get(k)!r} then, {run.get(k)!r} now" for k in differ[:3])
            raise OptionError(
                f"cannot resume from {literal(self.path)}: it was made with other settings ({literal(shown)}); "
                "rerun with the same settings, or without {0} and with {1} to start over",
                "resume", "overwrite",
            )

    def staging(self, step: int) -> Path:
        tmp = self.path / f".step-{step:07d}.{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        return tmp

    def write_shared(
        self, tmp: Path, weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], meta: dict[str, Any], state: TrainingState
    ) -> None:
        _save(weights, tmp / "weights.safetensors")
        _save(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta) + "\n")
        (tmp / STATE_FILE).write_text(json.dumps(state.to_json()) + "\n")

    @staticmethod
    def write_rng(tmp: Path, rank: int) -> None:
        _save(rng_tensors(), tmp / f"rng-rank{rank}.safetensors")

    def publish(self, tmp: Path, step: int, keep: int) -> Path:
        """Rename a complete staging folder into place and drop all but the ``keep`` newest."""
        _fsync_dir(tmp)
        final = self.path / f"step-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(self.path)
        # Newer ones are damaged checkpoints a resume skipped: this run is about to write them again.
        for old in self.complete():
            if old.name > final.name:
                shutil.rmtree(old, ignore_errors=True)
        for old in self.complete()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], TrainingState]:
        """weights, optimizer tensors, optimizer groups, this process's RNG state and the training state."""
        rng_file = folder / f"rng-rank{rank}.safetensors"
        if not rng_file.is_file():
            raise SqueezeError(f"checkpoint {folder} has no random state for process {rank}: it was made with fewer processes")
        raw = json.loads((folder / STATE_FILE).read_text())
        state = TrainingState(raw["step"], raw["tokens"], raw["train_seconds"], raw["curve"])
        return (
            load_file(str(folder / "weights.safetensors")),
            load_file(str(folder / "optimizer.safetensors")),
            json.loads((folder / "optimizer.json").read_text()),
            load_file(str(rng_file)),
            state,
        )
