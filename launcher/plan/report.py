"""One plan row per layout (memory, traffic, step time, whether it fits) and its table and JSON forms."""

from __future__ import annotations

from dataclasses import dataclass

from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.plan.devices import GIB, Device
from ithaca.launcher.plan.layouts import Layout
from ithaca.launcher.plan.memory import MemoryTerms, peak_memory
from ithaca.launcher.plan.step_time import StepTime, step_time
from ithaca.launcher.plan.traffic import Collective, step_traffic


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: MemoryTerms
    traffic: dict[str, Collective]
    time: StepTime
    memory_limit: int
    """Bytes one rank may hold (the device's memory; on the CPU, the machine's RAM shared by the ranks on it)."""

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.memory_limit

    def as_json(self) -> dict:
        return {"layout": vars(self.layout), "fits": self.fits, "peak_mem_bytes": self.memory.total,
                "memory_limit_bytes": self.memory_limit, "mem_terms": self.memory.as_dict(),
                "largest_term": self.memory.largest,
                "bytes_per_step": {name: {"intra_node": 0 if c.inter_node else c.bytes,
                                          "inter_node": c.bytes if c.inter_node else 0}
                                   for name, c in self.traffic.items()},
                "step_time_s": self.time.step_s, "compute_s": self.time.compute_s,
                "exposed_comm_s": self.time.exposed_comm_s,
                "tokens_per_s_per_gpu": self.time.tokens_per_s_per_gpu, "mfu": self.time.mfu}

    def line(self) -> str:
        why = "" if self.fits else f"  over by {(self.memory.total - self.memory_limit) / GIB:.2f} GiB: " \
                                   f"{self.memory.largest} {self.memory.as_dict()[self.memory.largest] / GIB:.2f} GiB"
        return (f"{self.layout.short():<58} {self.memory.total / GIB:8.2f} {self.time.step_s:10.4g} "
                f"{self.time.tokens_per_s_per_gpu:12.1f} {self.time.mfu:6.3f}{why}")


HEADER = f"{'layout':<58} {'peak GiB':>8} {'step s':>10} {'tok/s/gpu':>12} {'mfu':>6}"


def memory_limit(device: Device, gpus: int, gpus_per_node: int) -> int:
    """Bytes one rank may hold: the device's memory, or on the CPU its RAM shared by the node's ranks."""
    return device.memory_bytes // (min(gpus, gpus_per_node) if device.name == "cpu" else 1)


def make_plan(cfg: RunConfig, device: Device, gpus: int, gpus_per_node: int) -> Plan:
    traffic = step_traffic(cfg, gpus_per_node)
    return Plan(layout=Layout.of(cfg), memory=peak_memory(cfg), traffic=traffic,
                time=step_time(cfg, traffic, device, gpus), memory_limit=memory_limit(device, gpus, gpus_per_node))


def best_first(plans: list[Plan]) -> list[Plan]:
    """Fastest first (tokens/s/GPU), then the smallest peak."""
    return sorted(plans, key=lambda p: (-p.time.tokens_per_s_per_gpu, p.memory.total))


def render(plans: list[Plan], top: int) -> str:
    """The best `top` that fit, then the best `top` that do not, each with the term that breaks it."""
    ranked = best_first(plans)
    fit = [p for p in ranked if p.fits][:top]
    over = [p for p in ranked if not p.fits][:top]
    lines = [f"{len(plans)} layouts the config check accepts; {sum(p.fits for p in plans)} fit.", ""]
    if fit:
        lines += [f"best {len(fit)} that fit:", HEADER, *(p.line() for p in fit), ""]
    if over:
        lines += [f"best {len(over)} that do not fit:", HEADER, *(p.line() for p in over)]
    return "\n".join(lines).rstrip()
