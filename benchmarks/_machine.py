"""The line every benchmark prints with its timings: CPU capability, threads, device."""

from __future__ import annotations

import platform

import torch


def machine_line() -> str:
    """``CPU capability AVX512, 2 torch threads, <processor>`` (plus the GPU's name when there is one)."""
    line = (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} torch threads"
    )
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    line += f", {cpu}"
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line
