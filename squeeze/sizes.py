"""Sizes in bytes as people write them: ``5GB``, ``500MiB``, ``2.5 GB``, ``123``."""

from __future__ import annotations

import re

from squeeze.errors import OptionError, literal

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
        size = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if size < 1:
        raise OptionError(f"{{0}} must be at least one byte, not {literal(repr(value))}", option)
    return size
