"""`ithaca plan`'s step time against measured training steps, and a device file calibrated from them.

What it measures: real `ithaca train` runs (DeepSpeed, gloo, fp32, one thread per rank, shards of
`ithaca prep`'s default corpus) of one model under several layouts, --steps steps each; the median
of the step lines' `s_step` after --warmup steps. The first case, one rank, calibrates the device:
the plan's compute term for it, set equal to its measured step, fixes `efficiency` (the fraction of
the base device's peak a step's FLOPs reach). The warm-up must cover the steps whose live tensors
the CPU step meter counts (launcher/train/metrics.py COUNTED_CPU_STEPS: counting slows them about
2x). The calibrated device is written as a YAML file that
`ithaca plan --device FILE` takes. Every other layout's step is then predicted with it and set beside
its measurement. Only `efficiency` is fitted: the link figures (bandwidth, latency per message) stay
the base row's assumptions, so what a multi-rank case's prediction misses is the communication and
overlap model's error (or the machine's: on the CPU every rank shares the two cores' memory).

Run:  python -m ithaca.bench.step_time_check --out runs/step-time-check     (CPU: about 8 minutes)
The cases are sized for CPU ranks; a GPU version (bf16, a model and lengths a GPU needs) is not written.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ithaca.bench.header import bench_header
from ithaca.launcher.config.load import load_config
from ithaca.launcher.plan.devices import Device, load_device, this_machine
from ithaca.launcher.plan.report import Plan, make_plan
from ithaca.launcher.train.metrics import COUNTED_CPU_STEPS

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.ffn_dim=768",
         "data.seq_len=1024", "train.global_batch=2", "train.micro_batch=1", "train.precision=fp32",
         "train.log_every=1", "checkpoint.every=1000", "model.activation_checkpointing=none"]
"""A model big enough that a step's FLOPs, not Python's overhead, take most of its time on one core."""

CASES: dict[str, list[str]] = {
    "one rank": ["parallel.dp=1"],
    "dp2 ZeRO-1": ["parallel.dp=2", "train.zero_stage=1"],
    "sp2 ulysses": ["parallel.dp=1", "parallel.sp=2", "parallel.sp_method=ulysses"],
    "sp2 ring": ["parallel.dp=1", "parallel.sp=2", "parallel.sp_method=ring"],
    "tp2": ["parallel.dp=1", "parallel.tp=2"],
    "pp2": ["parallel.dp=1", "parallel.pp=2"],
    "sp2 ring, full checkpointing": ["parallel.dp=1", "parallel.sp=2", "parallel.sp_method=ring",
                                     "model.activation_checkpointing=full"],
}
"""The first case has one rank: it calibrates."""

_STEP_LINE = re.compile(r"\bstep=(\d+) .*\bs_step=([0-9.]+)")


@dataclass(frozen=True)
class Measured:
    case: str
    overrides: list[str]
    step_s: float
    """Median of the step lines' s_step after the warm-up."""


def step_seconds(log_text: str, warmup: int) -> list[float]:
    """The `s_step` of every step line after step `warmup`, in step order."""
    steps = {int(m[1]): float(m[2]) for m in _STEP_LINE.finditer(log_text)}
    return [steps[s] for s in sorted(steps) if s > warmup]


def calibrated(device: Device, plan: Plan, measured_step_s: float) -> Device:
    """`device` with the efficiency at which `plan`'s step takes `measured_step_s`: its compute term
    scales as 1 / efficiency, its exposed communication does not. Raises ValueError when the
    measurement is not longer than that communication alone."""
    compute = measured_step_s - plan.time.exposed_comm_s
    if compute <= 0:
        raise ValueError(f"measured {measured_step_s:.3g} s, but the plan's exposed communication alone is "
                         f"{plan.time.exposed_comm_s:.3g} s: calibrate on a case with less communication")
    efficiency = device.efficiency * plan.time.compute_s / compute
    if not 0 < efficiency <= 1:
        raise ValueError(f"the fitted efficiency {efficiency:.3g} is not in (0, 1]: the base device's peak "
                         f"({device.bf16_tflops} TFLOP/s) is below what the run measured; raise bf16_tflops")
    return dataclasses.replace(device, name=f"{device.name}-calibrated", efficiency=efficiency)


def plan_for(overrides: list[str], device: Device, gpus_per_node: int) -> Plan:
    cfg = load_config("debug-cpu", [*MODEL, *overrides, "data.path=unused"])
    gpus = cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.sp
    return make_plan(cfg, device, gpus=gpus, gpus_per_node=min(gpus, gpus_per_node))


def run_case(case: str, overrides: list[str], data: Path, out: Path, steps: int, warmup: int) -> Measured:
    """One `ithaca train` run; raises RuntimeError with the run's last lines if it fails."""
    output = out / re.sub(r"[^a-z0-9]+", "-", case.lower()).strip("-")
    argv = [sys.executable, "-m", "ithaca", "train", "--config", "debug-cpu",
            *(f"--set={o}" for o in [*MODEL, *overrides, f"data.path={data}", f"train.steps={steps}",
                                     f"train.output_dir={output}"])]
    done = subprocess.run(argv, capture_output=True, text=True)
    text = done.stdout + done.stderr
    seconds = step_seconds(text, warmup)
    if done.returncode != 0 or not seconds:
        raise RuntimeError(f"{case}: `ithaca train` exited {done.returncode}:\n" + "\n".join(text.splitlines()[-15:]))
    return Measured(case, overrides, statistics.median(seconds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/step-time-check"),
                        help="runs, shards and the calibrated device file go here")
    parser.add_argument("--device", help="the base device row or file (default: this machine's)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=COUNTED_CPU_STEPS)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                        help="the first one named calibrates (it should have one rank)")
    args = parser.parse_args(argv)
    device = load_device(args.device) if args.device else this_machine()
    print(bench_header("step_time_check", "cpu" if device.name == "cpu" else "cuda",
                       f"fp32, {' '.join(MODEL)}, {args.steps} steps, median after {args.warmup}"))
    data = args.out / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "ithaca", "prep", "--output", str(data)], check=True,
                       capture_output=True)
    measured = [run_case(c, CASES[c], data, args.out, args.steps, args.warmup) for c in args.cases]
    base = measured[0]
    fitted = calibrated(device, plan_for(base.overrides, device, args.gpus_per_node), base.step_s)
    device_file = args.out / "calibrated-device.yaml"
    device_file.write_text(yaml.safe_dump(dataclasses.asdict(fitted), sort_keys=False))
    print(f"calibrated on '{base.case}': efficiency {device.efficiency:.3g} -> {fitted.efficiency:.3g}; "
          f"written to {device_file} (ithaca plan --device {device_file})")
    print("| case | predicted s/step (compute + exposed comm) | measured s/step | predicted/measured |")
    print("|---|---|---|---|")
    for m in measured:
        plan = plan_for(m.overrides, fitted, args.gpus_per_node)
        t = plan.time
        print(f"| {m.case} | {t.step_s:.3f} ({t.compute_s:.3f} + {t.exposed_comm_s:.3f}) | {m.step_s:.3f} | "
              f"{t.step_s / m.step_s:.2f} |")


if __name__ == "__main__":
    main()
