"""Sizes in bytes as people write them (``5GB``, ``500MiB``, ``2.5 GB``, ``123``), and the memory
there is to spend."""

from __future__ import annotations

import math
import os
import re

import torch

from squeeze.errors import OptionError, literal
from squeeze.processes import local_processes

# decimal and binary units, as transformers' max_shard_size reads them ("5GB" is 5 * 10**9 bytes)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)?\s*")


def parse_size(value: int | str, option: str) -> int:
    """``value`` in bytes (an int is taken as bytes); OptionError naming ``option`` unless it is a
    positive size."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value).upper())
        if match is None:
            raise OptionError(f"{{0}} must be a size such as 5GB or 500MiB, not {literal(repr(value))}", option)
        number = float(match.group(1)) * _UNITS[match.group(2) or ""]
        if not math.isfinite(number):
            raise OptionError(f"{{0}} must be a size such as 5GB or 500MiB, not {literal(repr(value)[:40])}", option)
        size = int(number)
    if size < 1:
        raise OptionError(f"{{0}} must be at least one byte, not {literal(repr(value))}", option)
    return size


def in_gib(size: int) -> str:
    """``size`` bytes for a message: ``1.97 GiB``, or MiB below one GiB, KiB below one MiB."""
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have now (Linux ``MemAvailable``; the machine's
    physical memory elsewhere); None when neither can be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int | None:
    """The memory a run may plan for when the user names no budget: what is available now less a
    margin for the rest of the machine (a tenth of it, at least 1 GiB), shared evenly by the
    processes torchrun started on this machine; None when unknown."""
    available = available_memory()
    if available is None:
        return None
    return max(available - max(available // 10, 2**30), 0) // max(local_processes(), 1)


def accelerator_memory(device: str) -> int | None:
    """Free bytes on ``device`` when it is a CUDA GPU (``cuda``, ``cuda:N``, or ``auto`` with one
    present); None on the CPU."""
    if not device.startswith("cuda") and device != "auto" or not torch.cuda.is_available():
        return None
    index = int(device.partition(":")[2] or 0)
    return torch.cuda.mem_get_info(index)[0]
