"""Memory and speed of a training step, for its log line and MLflow: peak memory and MFU.

Peak memory is the largest over the run's ranks (pipeline stages differ) of each process's high-water
mark since the previous read, which resets it:
- CUDA: the caching allocator's peak of bytes held by tensors (`torch.cuda.max_memory_allocated`);
  memory it reserved but did not hand out, and NCCL or cuBLAS workspaces, are not in it.
- CPU: the process's peak resident set size (getrusage's ru_maxrss), which also holds the
  interpreter and its libraries but not the data loader's worker processes; Linux resets it
  through /proc/self/clear_refs, elsewhere it is the peak since the process started.

MFU, model FLOPs utilization (PaLM, arXiv:2204.02311, appendix B):

    MFU = (6 N + 12 L H Q T) * tokens/s / (devices * one device's peak FLOP/s)

N = the parameters that multiply activations, of the whole model (before any tp or pp split):
all but the input embedding table, a lookup (tied to the output projection, it counts once as
that matmul); L = softmax-attention layers, H heads, Q head dim, T sequence length. 6N is the
forward and backward matmuls; 12LHQT is attention's scores and weighted sum, over the whole
T x T square as PaLM counts it (the causal half and document masking are not subtracted).
Linear-attention and delta-rule layers' state work (O(T Q^2) per head) is not counted, so MFU is an
underestimate for hybrid and linear models; recomputed forwards are not counted either (that
would be HFU).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ithaca.log import get_logger, warn_once
from ithaca.models.llama_args import LlamaArgs

log = get_logger(__name__)

GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
"""Dense bf16 FLOP/s and HBM bytes/s of the SXM parts, keyed by a piece of the CUDA device name."""


def gpu_peaks(name: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of the GPU named `name` (`torch.cuda.get_device_name()`, e.g. "NVIDIA H100
    80GB HBM3"); None for a GPU not in GPU_PEAKS, or a PCIe or NVL part (lower clocks and power)."""
    if "PCIe" in name or "NVL" in name:
        return None
    return next((peaks for key, peaks in GPU_PEAKS.items() if key in name), None)


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


def flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """6 N + 12 L H Q T: training FLOPs per token of a `seq_len`-token sequence (module docstring)."""
    softmax_layers = sum(args.mixer(i) == "S" for i in range(args.n_layers))
    return 6 * matmul_params(args) + 12 * softmax_layers * args.n_heads * args.head_dim * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """The fraction of `peak_flops` (summed over every device that worked on the tokens) reached."""
    return flops_per_token * tokens_per_s / peak_flops


def read_peak_memory(device: torch.device) -> int:
    """This process's peak bytes on `device` since the previous call (the first: since start), and
    a reset so that the next call covers only what runs in between (module docstring)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    try:
        Path("/proc/self/clear_refs").write_text("5")  # proc(5): "5" resets the peak RSS to the current RSS
    except OSError as e:
        warn_once(log, f"peak_mem_gib on the CPU is the peak since the process started: cannot reset it ({e})")
    return peak


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
        memory = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS"
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        speed = (f"mfu against {self.peak_flops / 1e12:g} TFLOP/s x {world_size} devices"
                 if self.peak_flops is not None
                 else f"mfu not reported: no peak FLOP/s known for {where}; set train.peak_tflops to report it")
        log.info(f"step metrics: peak_mem_gib = the largest over ranks of each one's {memory} in each step "
                 f"(step 1's includes the set-up); {speed}")

    def read(self, tokens: int, seconds: float) -> dict[str, float]:
        """{"peak_mem_gib", and "mfu" where a peak is known} for a step of `tokens` (all ranks') in `seconds`."""
        metrics = {"peak_mem_gib": largest_over_ranks(read_peak_memory(self.device), self.device) / 2**30}
        if self.peak_flops is not None:
            metrics["mfu"] = mfu(self.flops_per_token, tokens / seconds, self.world_size * self.peak_flops)
        return metrics
