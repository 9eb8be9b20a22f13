"""Step time: compute from FLOPs at the device's efficiency, communication by latency and bandwidth.

    compute   = FLOPs of the step's tokens (launcher/train/metrics.py: 6 N plus the sequence mixing of
                softmax, linear-attention and delta-rule layers per token, plus what recomputation
                runs again: full a third of it all, selective a third of the mixing) / gpus / (bf16
                peak x efficiency), times the pipeline's bubble (m + pp - 1) / m for m micro-batches
    a message = latency + bytes / link bandwidth (intra- or inter-node, launcher/plan/traffic.py)
    exposed   = what no compute hides: the ring's block exchange runs during the blocks' attention,
                so only what exceeds the softmax layers' mixing share of compute shows; Ulysses'
                all-to-alls, the K/V and state all-gathers, the scan (its chain: launcher/plan/traffic.py),
                tp's all-reduces, pipeline sends and DeepSpeed's gradient reduction (overlap_comm off,
                its default below ZeRO-3) are all exposed. Latency counts messages per layer of the
                stage, every layer alike, except the scan's, which counts its linear and delta layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ithaca.launcher.plan.devices import Device
from ithaca.launcher.plan.traffic import Collective
from ithaca.launcher.train.metrics import flops_per_token, sequence_mixing_flops_per_token


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    exposed_comm_s: float
    tokens_per_s_per_gpu: float
    mfu: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s


def step_time(cfg, traffic: dict[str, Collective], device: Device, gpus: int) -> StepTime:
    """The predicted step of `cfg` (a RunConfig) on `gpus` devices with `traffic` per rank."""
    args = cfg.model
    tokens = cfg.train.global_batch * cfg.data.seq_len
    useful = flops_per_token(args, cfg.data.seq_len)
    mixing = sequence_mixing_flops_per_token(args, cfg.data.seq_len)
    recompute = {"none": 0.0, "selective": sum(mixing.values()) / 3, "full": useful / 3}[args.activation_checkpointing]
    rate = device.bf16_tflops * 1e12 * device.efficiency
    micro, pp = cfg.grad_accum_steps, cfg.parallel.pp
    compute = (useful + recompute) * tokens / gpus / rate * (micro + pp - 1) / micro
    mixer_compute = mixing["S"] * tokens / gpus / rate  # the share the ring hides behind
    exposed = hidden = 0.0
    for collective in traffic.values():
        bandwidth = (device.inter_node_gbps if collective.inter_node else device.intra_node_gbps) * 1e9
        seconds = collective.messages * device.latency_us * 1e-6 + collective.waited_bytes / bandwidth
        if collective.overlapped_with == "mixer":
            hidden += seconds
        else:
            exposed += seconds
    exposed += max(0.0, hidden - mixer_compute)
    step = compute + exposed
    return StepTime(compute_s=compute, exposed_comm_s=exposed, tokens_per_s_per_gpu=tokens / step / gpus,
                    mfu=useful * tokens / step / gpus / (device.bf16_tflops * 1e12))
