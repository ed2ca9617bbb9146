"""The processes torchrun started, and what they do together.

Every squeeze pass runs in one process, or, under ``torchrun --nproc-per-node N``, in N processes
of one process group (gloo on CPU, NCCL on CUDA). squeeze joins the group torchrun describes in
the environment, or uses the caller's own group when one is already up (and then leaves it up).

The collectives here stand between a process and the others: when another process fails, the
one waiting for it gets a :class:`SqueezeError` saying so in one line, instead of a backend
traceback.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from squeeze.errors import SqueezeError

T = TypeVar("T")

# The main process may evaluate, write the checkpoint or build a teacher cache while the others
# wait at a barrier: the group's timeout must outlast that.
GROUP_TIMEOUT = datetime.timedelta(hours=4)


def launched_processes() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_processes() -> int:
    """How many of torchrun's processes run on this machine (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes torchrun started (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process group was started by squeeze (and is ended by it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _together(self, collective: Callable[[], T]) -> T:
        try:
            return collective()
        except RuntimeError as exc:  # dist.DistError is one too
            if not _lost_peer(exc):
                raise  # a bug, not another process's failure
            # the backend's own message only says the connection closed
            raise SqueezeError(
                f"process {self.rank} of {self.world} stops: another process stopped first (its own message says why)"
            ) from None

    def barrier(self) -> None:
        if self.world > 1:
            self._together(dist.barrier)

    def mean(self, values: list[float]) -> list[float]:
        """Element-wise mean over processes."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device_of())
        self._together(lambda: dist.all_reduce(tensor))
        return (tensor / self.world).tolist()

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` combined over processes in place (``op``: sum, max or min); every process
        ends with the same values."""
        if self.world > 1:
            kind = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            self._together(lambda: dist.all_reduce(tensor, op=kind))
        return tensor

    def total(self, count: int) -> int:
        """``count`` summed over processes."""
        return int(self.reduce(torch.tensor([count], dtype=torch.int64, device=self.device_of()))[0]) if self.world > 1 else count

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` [rows_p, ...] stacked along dim 0 in process order, on every
        process (the row counts may differ; the other dimensions may not)."""
        if self.world == 1:
            return tensor
        counts = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.world)]
        self._together(lambda: dist.all_gather(sizes, counts))
        rows = [int(s[0]) for s in sizes]
        padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        self._together(lambda: dist.all_gather(pieces, padded.contiguous()))
        return torch.cat([piece[:n] for piece, n in zip(pieces, rows)])

    def broadcast(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """``tensor`` as process ``source`` holds it, on every process (in place; the others'
        must have its shape and dtype)."""
        if self.world > 1:
            self._together(lambda: dist.broadcast(tensor, source))
        return tensor

    def gather_objects(self, value: T) -> list[T]:
        """Every process's ``value`` (small, plain Python data made by squeeze itself), in process order."""
        if self.world == 1:
            return [value]
        gathered: list = [None] * self.world
        self._together(lambda: dist.all_gather_object(gathered, value))
        return gathered

    def rows(self, count: int) -> slice:
        """This process's share of ``count`` rows: contiguous, the shares as even as they can be."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def device_of(self) -> str:
        """Where the backend wants the tensors of a collective: NCCL on this process's GPU, gloo on the CPU."""
        if self.world > 1 and dist.get_backend() == "nccl":
            return f"cuda:{torch.cuda.current_device()}"
        return "cpu"


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another process went away (its connection closed, or
    it never came)."""
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in ("connection closed", "connection reset", "broken pipe", "timed out", "timeout"))


def start_processes(device: str) -> tuple[Processes, str]:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA);
    one process when there is none. Returns the group and this process's device."""
    world = launched_processes()
    if world == 1:
        return Processes(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=GROUP_TIMEOUT)
    return Processes(rank, world, local_rank, owns), device


def stop_processes(procs: Processes) -> None:
    """End the process group if squeeze started it (a caller's own group is left alone)."""
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()
