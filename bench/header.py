"""The first line every benchmark prints: what ran, where, on which versions and commit."""

from __future__ import annotations

import os
import subprocess

import torch


PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
"""Dense bf16 FLOP/s and HBM bytes/s of the SXM parts."""


def device_peaks(device: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of an H100/H200 SXM; None for any other device (PCIe and NVL parts differ)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    if "PCIe" in name or "NVL" in name:
        return None
    return next((peaks for key, peaks in PEAKS.items() if key in name), None)


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
