"""Byte budgets in configs (``16GiB``, ``512MiB``, ``auto``, ``0``) and how much memory a machine has free."""

from __future__ import annotations

import os
import re

import torch

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, name: str) -> int | None:
    """Bytes of a budget setting: an integer, a string such as ``16GiB`` / ``1.5GB`` / ``512MiB``, or
    ``auto`` / ``null`` (``None``: the component picks from the memory it finds)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a size such as 8GiB, a number of bytes or auto, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"{name} must be a size such as 8GiB, 512MiB or 2GB, a number of bytes, or auto; got {value!r}"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    if number < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return int(number * _UNITS[unit])


def format_size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


def host_available() -> int:
    """Bytes of RAM the kernel reports as available (free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_memory(device: torch.device) -> tuple[int, int]:
    """``(free, total)`` bytes of a CUDA device's memory."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)
