"""Memory and speed of a training step, for its log line and MLflow: peak memory and MFU.

Peak memory is the largest over the run's ranks (pipeline stages differ) of each process's high-water
mark since the previous read, which resets it:
- CUDA: the caching allocator's peak of bytes held by tensors (`torch.cuda.max_memory_allocated`);
  memory it reserved but did not hand out, and NCCL or cuBLAS workspaces, are not in it.
- CPU: the peak of live tensor bytes, what `ithaca plan` predicts (launcher/train/live_tensors.py:
  counted at the dispatcher from when the meter is built, the tensors that exist then included),
  in the first COUNTED_CPU_STEPS steps of the process; later steps report the last counted one's.

MFU, model FLOPs utilization (PaLM, arXiv:2204.02311, appendix B), extended to linear layers:

    MFU = (6 N + sequence mixing) * tokens/s / (devices * one device's peak FLOP/s)
    sequence mixing per token = 12 L_S H Q T + 12 L_L H Q (C + Q) + 6 L_D H Q (4 C + 3 Q)

N = the parameters that multiply activations, of the whole model (before any tp or pp split):
all but the input embedding table, a lookup (tied to the output projection, it counts once as
that matmul); H heads, Q head dim, T sequence length, C = CHUNK tokens. 6N is the forward and
backward matmuls; the backward costs twice the forward, so each mixing term is 3 x its forward:
- softmax attention (L_S layers): scores and weighted sum, 4 H Q T forward, over the whole T x T
  square as PaLM counts it (the causal half and document masking are not subtracted);
- linear attention (L_L layers), chunked: within each chunk the scores and weighted sum over the
  whole C x C square (4 C Q per head), and the state's read and update (4 Q^2);
- delta rule (L_D layers), chunked (kernels/delta_rule/chunked.py): K K^T, the triangular solve
  for [U_0 | W], Q K^T and the scores times U (8 C Q per head), W S, Q S and the update K^T U
  (6 Q^2).
Recomputed forwards are not counted (that would be HFU).
"""

from __future__ import annotations

import os
import threading

import torch
import torch.distributed as dist

from ithaca.launcher.plan.devices import DEVICES
from ithaca.launcher.plan.memory import CHUNK
from ithaca.launcher.train.live_tensors import LiveTensorBytes
from ithaca.log import get_logger
from ithaca.models.llama_args import LlamaArgs

log = get_logger(__name__)


def gpu_peaks(name: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of the GPU named `name` (`torch.cuda.get_device_name()`, e.g. "NVIDIA H100
    80GB HBM3"): the dense bf16 peak and HBM bandwidth of launcher/plan/devices.py's row for its
    SXM part; None for a GPU not in that table, or a PCIe or NVL part (lower clocks and power)."""
    if "PCIe" in name or "NVL" in name:
        return None
    row = next((device for key, device in DEVICES.items() if key in name.lower()), None)
    return None if row is None else (row.bf16_tflops * 1e12, row.hbm_gbps * 1e9)


def device_peak_flops(device: torch.device, peak_tflops: float | None) -> float | None:
    """One device's dense bf16 FLOP/s: `peak_tflops` (train.peak_tflops) when given, else the
    table's figure for this GPU; None on the CPU or a GPU not in the table."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    peaks = gpu_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return None if peaks is None else peaks[0]


def matmul_params(args: LlamaArgs) -> int:
    """N of the MFU formula, counted from `args` rather than from a rank's modules, which hold only
    their tp shards and pp stage (and nothing at all under ZeRO-3)."""
    embedding, *rest = args.part_parameters()
    return sum(rest) + (embedding if args.tie_embeddings else 0)


def sequence_mixing_flops_per_token(args: LlamaArgs, seq_len: int) -> dict[str, float]:
    """Per layer kind ("S", "L", "D"), the training FLOPs per token its layers' sequence mixing costs
    for a `seq_len`-token sequence (module docstring)."""
    per_layer = {"S": 12 * seq_len, "L": 12 * (CHUNK + args.head_dim), "D": 6 * (4 * CHUNK + 3 * args.head_dim)}
    kinds = [args.mixer(i) for i in range(args.n_layers)]
    return {kind: kinds.count(kind) * args.n_heads * args.head_dim * per_layer[kind] for kind in per_layer}


def flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """6 N + sequence mixing: training FLOPs per token of a `seq_len`-token sequence (module docstring)."""
    return 6 * matmul_params(args) + sum(sequence_mixing_flops_per_token(args, seq_len).values())


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """The fraction of `peak_flops` (summed over every device that worked on the tokens) reached."""
    return flops_per_token * tokens_per_s / peak_flops


def read_peak_memory(device: torch.device) -> int:
    """This process's CUDA allocator peak on `device` since the previous call (the first: since
    start), and a reset so that the next call covers only what runs in between."""
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


COUNTED_CPU_STEPS = 3
"""CPU steps whose live tensors are counted. Counting at the dispatcher costs every op (measured, one
process: debug-cpu's step 59 -> 107 ms, demo-long-cpu's model at 2K tokens 574 -> 1332 ms), so it stops
after these: the first has the set-up's allocations in it, and the later ones repeat the same shapes."""


class CpuStepPeak:
    """Live tensor bytes of this process's first COUNTED_CPU_STEPS steps (module docstring)."""

    def __init__(self) -> None:
        self.counter: LiveTensorBytes | None = LiveTensorBytes()
        self.counter.count_existing()
        self.counter.__enter__()  # left at the COUNTED_CPU_STEPS-th read; ops until then are counted
        self.counted = 0
        self.last = 0
        self.thread = threading.get_ident()  # a mode is its thread's own
        # a process forked meanwhile (the data loader's workers) would count its every op for good
        os.register_at_fork(after_in_child=self._stop)

    def _stop(self) -> None:
        if self.counter is not None and threading.get_ident() == self.thread:
            self.counter.__exit__(None, None, None)
        self.counter = None

    def read(self) -> int:
        """The peak since the previous read (the first: since built), or after the counted steps the
        last counted one's."""
        if self.counter is not None:
            self.last = self.counter.peak
            self.counter.reset_peak()
            self.counted += 1
            if self.counted == COUNTED_CPU_STEPS:
                self._stop()
        return self.last


def largest_over_ranks(value: int, device: torch.device) -> int:
    """The largest `value` any rank of the default process group holds (a collective: every rank calls
    it); `value` itself without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    largest = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return int(largest.item())


class StepMeter:
    """Built once per run, read after each step on every rank (each read resets the peak and takes the
    largest over ranks): rank 0's figures go to the step line and MLflow. Says once what it measures
    and whether MFU is reported."""

    def __init__(self, args: LlamaArgs, seq_len: int, device: torch.device, world_size: int,
                 peak_tflops: float | None):
        self.device, self.world_size = device, world_size
        self.flops_per_token = flops_per_token(args, seq_len)
        self.peak_flops = device_peak_flops(device, peak_tflops)
        self.cpu_peak = CpuStepPeak() if device.type == "cpu" else None
        memory = ("CUDA allocator peak in each step" if device.type == "cuda" else
                  f"peak of live tensor bytes in each of its first {COUNTED_CPU_STEPS} steps, then the last of "
                  f"those again (counting every op slows a CPU step about 2x)")
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        speed = (f"mfu against {self.peak_flops / 1e12:g} TFLOP/s x {world_size} devices"
                 if self.peak_flops is not None
                 else f"mfu not reported: no peak FLOP/s known for {where}; set train.peak_tflops to report it")
        log.info(f"step metrics: peak_mem_gib = the largest over ranks of each one's {memory}; step 1's includes "
                 f"the set-up; {speed}")

    def read(self, tokens: int, seconds: float) -> dict[str, float]:
        """{"peak_mem_gib", and "mfu" where a peak is known} for a step of `tokens` (all ranks') in `seconds`."""
        peak = read_peak_memory(self.device) if self.cpu_peak is None else self.cpu_peak.read()
        metrics = {"peak_mem_gib": largest_over_ranks(peak, self.device) / 2**30}
        if self.peak_flops is not None:
            metrics["mfu"] = mfu(self.flops_per_token, tokens / seconds, self.world_size * self.peak_flops)
        return metrics
