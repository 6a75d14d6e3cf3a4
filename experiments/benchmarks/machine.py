"""One description of the machine a benchmark ran on, shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine(device: str = "cpu") -> str:
    """CPU model, cores, RAM, the GPU when ``device == "cuda"``, and the torch/numpy versions."""
    import numpy as np
    import torch  # imported here: the metrics benchmark's driver process must not load torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), {memory:.0f} GiB RAM, "
        f"{gpu}; Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}"
    )
