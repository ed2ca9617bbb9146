"""Data-parallel calibration: N processes share the calibration batches and every statistic.

Inside :func:`data_parallel`, the block-by-block pipeline gives each process a contiguous share
of the calibration batches (process 0 the first ones), so each runs only its share through the
current block. What the methods measure there is then combined so that every process holds the
statistic one process would have measured on all the batches: Hessians and input norms are
summed with their row counts, ranges and channel maxima take the extremes, and the rows AWQ and
SmoothQuant sample are gathered in the one-process order. The solves that follow are split by
output rows (GPTQ, SparseGPT and AWQ's clip search treat rows independently) and their results
gathered, so every process ends each block with the same compressed weights, which the next
block's inputs are computed from. Solves that are not independent by rows (HQQ's stops on the
whole layer's error) go to processes whole, by cost, and their results are sent to every process.

Outside that context (the default) there is one process and every function here is the identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

from squeeze.errors import SqueezeError
from squeeze.processes import Processes

T = TypeVar("T")

_PROCESSES: ContextVar[Processes] = ContextVar("calibration_processes", default=Processes())


@contextmanager
def data_parallel(procs: Processes) -> Iterator[None]:
    """Within this context, calibration is shared by the processes of ``procs`` (every one of them
    must run the same pass on the same model and batches)."""
    token = _PROCESSES.set(procs)
    try:
        yield
    finally:
        _PROCESSES.reset(token)


def calibration_processes() -> Processes:
    """The processes sharing the current calibration (one, outside :func:`data_parallel`)."""
    return _PROCESSES.get()


def share(batches: list[T]) -> list[T]:
    """This process's contiguous share of the calibration ``batches``."""
    procs = calibration_processes()
    if procs.world == 1:
        return batches
    if len(batches) < procs.world:
        raise SqueezeError(
            f"{len(batches)} calibration batch(es) for {procs.world} processes: each process needs one at least "
            "(more calibration samples, a smaller batch size, or fewer processes)"
        )
    return batches[procs.rows(len(batches))]


def reduce_mean(mean: torch.Tensor, rows: int) -> int:
    """``mean`` (over this process's ``rows``) becomes, in place, the mean over every process's
    rows; returns the rows of all processes."""
    procs = calibration_processes()
    if procs.world == 1:
        return rows
    total = procs.total(rows)
    mean.mul_(rows / max(total, 1))
    procs.reduce(mean)
    return total


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over processes, in place."""
    return calibration_processes().reduce(tensor)


def reduce_extreme(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``tensor`` combined over processes in place by ``op`` ("max" or "min")."""
    return calibration_processes().reduce(tensor, op)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``tensor`` in process order (their share order)."""
    return calibration_processes().gather_rows(tensor)


def solve_by_rows(count: int) -> slice:
    """The output rows this process solves of a layer with ``count`` rows (all of them in one
    process, or when there are fewer rows than processes)."""
    procs = calibration_processes()
    return procs.rows(count) if 1 < procs.world <= count else slice(None)


def solve_owners(costs: list[float]) -> list[int]:
    """Which process solves each of the solves costing ``costs`` (any unit): the costliest first,
    each to the process with the least work so far (every one to process 0 in one process)."""
    procs = calibration_processes()
    owners, load = [0] * len(costs), [0.0] * procs.world
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owner = min(range(procs.world), key=lambda rank: (load[rank], rank))
        owners[index] = owner
        load[owner] += costs[index]
    return owners


def from_owner(owner: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The ``tensors`` of a solve as process ``owner`` computed them, on every process (the others
    pass tensors of the same shapes and dtypes to receive them in)."""
    procs = calibration_processes()
    return tuple(procs.broadcast(t.contiguous(), owner) for t in tensors)
