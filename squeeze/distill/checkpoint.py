"""Training checkpoints: safetensors and JSON only (nothing pickled), written atomically.

A checkpoint is a folder ``step-NNNNNNN`` inside the checkpoint directory holding the trained
weights, the optimizer's moments, each process's random-number state and ``state.json``. It is
written under a temporary name and renamed into place when complete, so a run killed mid-write
leaves either the previous checkpoint or the new one, never half of one; leftovers of a killed
write are removed on the next start. ``run.json`` beside the checkpoints records the settings the
run was started with; a resume with other settings is refused.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from squeeze.errors import OptionError, SqueezeError, literal

RUN_FILE = "run.json"
STATE_FILE = "state.json"  # written last: a folder without it is incomplete
_STEP_DIR = re.compile(r"^step-(\d{7})$")


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


class CheckpointDir:
    """The checkpoints of one run; only process 0 writes the shared parts."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def complete(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

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
        return json.loads(file.read_text()) if file.is_file() else None

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
