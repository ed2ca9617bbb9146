"""Where squeeze computes: the device and compute dtype a user names, and the machine it runs on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from squeeze.errors import OptionError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu; a CUDA device that is not there is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"device {device!r} requested but no CUDA GPU is available; use {{0}} cpu", "device")
    if not (device == "cpu" or device.startswith("cuda")):
        raise OptionError(f"unknown {{0}} {device!r}; use cpu, cuda, cuda:N or auto", "device")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    """The dtype the model is loaded and run in (calibration, evaluation); a user error if unknown."""
    if dtype not in COMPUTE_DTYPES:
        raise OptionError(f"unknown {{0}} {dtype!r}; choose one of: {', '.join(COMPUTE_DTYPES)}", "dtype")
    return getattr(torch, dtype)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the CPU, its cores, torch and its threads, for benchmark records."""
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
