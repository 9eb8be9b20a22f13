"""The devices a plan is made for: one table of figures per accelerator, and YAML overrides of it.

Figures are per device: memory a program can hold, dense bf16 peak, HBM bandwidth, and the link
bandwidth one device has to another inside its node and across nodes (one direction). `efficiency`
is the fraction of the peak a training step's matmuls reach (MFU) and `latency_us` one collective
hop's fixed cost; both are assumptions. To calibrate, write a run's measured figures into a device
file: its logged mfu as `efficiency`, bench/sp_attention.py's bytes over time as `intra_node_gbps`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ithaca.launcher.config.schema import ConfigError

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class Device:
    name: str
    memory_gib: float
    """Memory one rank may hold (what torch reports as the device's total)."""
    bf16_tflops: float
    """Dense bf16 peak, TFLOP/s (the CPU row: its fp32 matmul rate, what CPU runs train in)."""
    hbm_gbps: float
    """HBM bandwidth, GB/s (listed; the step-time model counts FLOPs only and does not read it yet)."""
    intra_node_gbps: float
    """One direction, device to device inside a node (NVLink; the CPU: gloo over loopback)."""
    inter_node_gbps: float
    """One direction, per device, across nodes (its share of the node's network)."""
    efficiency: float = 0.4
    """Fraction of bf16_tflops a step's compute reaches."""
    latency_us: float = 10.0
    """Fixed cost of one collective step (one hop of a ring, one all-to-all)."""

    def __post_init__(self) -> None:
        for key in ("memory_gib", "bf16_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps", "latency_us"):
            if not 0 < getattr(self, key) < float("inf"):
                raise ConfigError(f"device.{key}", getattr(self, key), "use a finite number > 0")
        if not 0 < self.efficiency <= 1:
            raise ConfigError("device.efficiency", self.efficiency, "use a fraction in (0, 1]")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


def _cpu() -> Device:
    """This machine: its RAM (shared by every rank the plan puts on it), a few cores' fp32 rate."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Device(name="cpu", memory_gib=round(ram, 2), bf16_tflops=0.05 * (os.cpu_count() or 1),
                  hbm_gbps=20.0, intra_node_gbps=5.0, inter_node_gbps=1.25, efficiency=0.5, latency_us=50.0)


# Memory: torch.cuda.get_device_properties().total_memory of each part. Links per direction:
# NVLink 4 (H100, H200) 450 GB/s, NVLink 3 (A100) 300, NVLink 5 (B200) 900; network: one 400 Gb/s
# NIC per GPU (A100: 200 Gb/s).
DEVICES: dict[str, Device] = {
    "h100": Device(name="h100", memory_gib=79.6, bf16_tflops=989.0, hbm_gbps=3350.0, intra_node_gbps=450.0,
                   inter_node_gbps=50.0),
    "h200": Device(name="h200", memory_gib=140.4, bf16_tflops=989.0, hbm_gbps=4800.0, intra_node_gbps=450.0,
                   inter_node_gbps=50.0),
    "a100": Device(name="a100", memory_gib=79.2, bf16_tflops=312.0, hbm_gbps=2039.0, intra_node_gbps=300.0,
                   inter_node_gbps=25.0),
    "b200": Device(name="b200", memory_gib=178.4, bf16_tflops=2250.0, hbm_gbps=8000.0, intra_node_gbps=900.0,
                   inter_node_gbps=50.0),
}


def device_names() -> list[str]:
    return [*DEVICES, "cpu"]


def load_device(spec: str) -> Device:
    """A device by table name (h100, h200, a100, b200, cpu), or a YAML file of Device keys, those
    left out taken from the CPU row; unknown keys and bad values are refused (ConfigError)."""
    if spec.lower() in DEVICES:
        return DEVICES[spec.lower()]
    if spec.lower() == "cpu":
        return _cpu()
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("--device", spec, f"not a device name ({', '.join(device_names())}) nor a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--device", spec, f"not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--device", spec, "give a mapping of device keys")
    known = [f.name for f in dataclasses.fields(Device)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"--device {spec}", unknown[0], f"unknown key; use {', '.join(known)}")
    for key, value in raw.items():
        wanted = str if key == "name" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise ConfigError(f"device.{key}", value, "use a name" if key == "name" else "use a number")
    return dataclasses.replace(_cpu(), **{"name": path.stem, **raw})


def this_machine() -> Device:
    """The device ranks started here run on: CUDA GPU 0 (the table's figures for its kind, its own
    memory), or the CPU row."""
    import torch

    if not torch.cuda.is_available():
        return _cpu()
    name = torch.cuda.get_device_name(0)
    row = next((d for key, d in DEVICES.items() if key in name.lower()), DEVICES["h100"])
    return dataclasses.replace(row, name=name, memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB)
