"""The first line every benchmark prints: what ran, where, on which versions and commit."""

from __future__ import annotations

import os
import subprocess

import torch

from ithaca.launcher.train.metrics import gpu_peaks


def device_peaks(device: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of this GPU from the training loop's table; None on the CPU or a GPU not in it."""
    return gpu_peaks(torch.cuda.get_device_name()) if device == "cuda" else None


def bench_header(name: str, device: str, details: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return (f"# {name}: device={where} torch={torch.__version__} triton={triton_version} commit={commit} "
            f"{details}")
