"""Step time: compute from FLOPs at the device's efficiency, communication by latency and bandwidth.

    compute   = FLOPs of the step's tokens (launcher/train/metrics.py: 6 N + 12 L H Q T per token,
                plus what recomputation runs again: full 2 N + 4 L H Q T, selective the attention
                share 4 L H Q T) / gpus / (bf16 peak x efficiency), times the pipeline's bubble
                (m + pp - 1) / m for m micro-batches
    a message = latency + bytes / link bandwidth (intra- or inter-node, launcher/plan/traffic.py)
    exposed   = what no compute hides: the ring's block exchange runs during the blocks' attention,
                so only what exceeds the attention's share of compute shows; Ulysses' all-to-alls,
                the K/V and state all-gathers, the scan (linear and delta-rule state work is not in
                the FLOP count, so nothing is credited to hide it), tp's all-reduces, pipeline sends
                and DeepSpeed's gradient reduction (overlap_comm off, its default below ZeRO-3) are
                all exposed. Latency counts messages per layer of the stage, every layer alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ithaca.launcher.plan.devices import Device
from ithaca.launcher.plan.traffic import Collective
from ithaca.launcher.train.metrics import flops_per_token, matmul_params


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    exposed_comm_s: float
    tokens_per_s_per_gpu: float
    mfu: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def _mixer_flops_per_token(cfg) -> float:
    """12 L H Q T: the softmax layers' attention FLOPs per token (what recomputing a mixer repeats)."""
    args = cfg.model
    return flops_per_token(args, cfg.data.seq_len) - 6 * matmul_params(args)


def step_time(cfg, traffic: dict[str, Collective], device: Device, gpus: int) -> StepTime:
    """The predicted step of `cfg` (a RunConfig) on `gpus` devices with `traffic` per rank."""
    args = cfg.model
    tokens = cfg.train.global_batch * cfg.data.seq_len
    useful = flops_per_token(args, cfg.data.seq_len)
    attention = _mixer_flops_per_token(cfg)
    recompute = {"none": 0.0, "selective": attention / 3, "full": useful / 3}[args.activation_checkpointing]
    rate = device.bf16_tflops * 1e12 * device.efficiency
    micro, pp = cfg.grad_accum_steps, cfg.parallel.pp
    compute = (useful + recompute) * tokens / gpus / rate * (micro + pp - 1) / micro
    mixer_compute = attention * tokens / gpus / rate  # the share the ring hides behind
    exposed = hidden = 0.0
    for collective in traffic.values():
        bandwidth = (device.inter_node_gbps if collective.inter_node else device.intra_node_gbps) * 1e9
        seconds = collective.messages * device.latency_us * 1e-6 + collective.bytes / bandwidth
        if collective.overlapped_with == "mixer":
            hidden += seconds
        else:
            exposed += seconds
    exposed += max(0.0, hidden - mixer_compute)
    step = compute + exposed
    return StepTime(compute_s=compute, exposed_comm_s=exposed, tokens_per_s_per_gpu=tokens / step / gpus,
                    mfu=useful * tokens / step / gpus / (device.bf16_tflops * 1e12))
