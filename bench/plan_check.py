"""`ithaca plan`'s activation memory against measurement: the peak of live tensor bytes per rank.

Each case is a model and layout (config overrides on a base config); its tp x sp ranks run as
gloo processes on this machine, each building its part of the model as training does
(parallelize_llama), its gradients allocated first (the backward adds into them in place), then
one forward + backward of its part of a packed batch (documents of DOC tokens) under
bench/peak_memory.py's live-tensor counter. The largest peak over ranks is set beside the plan's
activation and loss terms for the same layout (launcher/plan/memory.py), which hold what the
step allocates beyond the weights and gradients.

`--steps` also measures whole training steps through DeepSpeed (STEP_CASES: dp2 under ZeRO 0-3, pp2,
sp2 with ZeRO-2): live tensor bytes counted from before the model is built, their peak over the
second step, against the plan's whole peak (model states and DeepSpeed's reduce bucket included).
Not covered: the GPU (bf16, other kernels).

`--calibrate` prints the measurements the plan's activation coefficients were fit to: per layer
kind and checkpointing mode, one layer's elements per token (peak of 3 layers - peak of 2) and
what lies outside the layers (peak of 2 - 2 layers), at several widths, head counts and ffn sizes.

Run:  python -m ithaca.bench.plan_check [--steps]       (CPU: about 15 minutes on 2 quiet cores)
      python -m ithaca.bench.plan_check --cases NAME ... [--steps --step-cases NAME ...]
      python -m ithaca.bench.plan_check --calibrate     (one process, about 10 minutes)
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
import torch.multiprocessing as mp

from ithaca.bench.header import bench_header
from ithaca.bench.rendezvous import free_port
from ithaca.launcher.plan.memory import peak_memory
from ithaca.launcher.plan.traffic import sp_bytes_by_rank

DOC = 1024
BASE = ["data.path=unused", "train.global_batch=1", "train.micro_batch=1", "parallel.dp=1", "model.n_heads=8",
        "model.n_kv_heads=2", "model.vocab_size=320"]
SMALL = ["model.dim=256", "model.ffn_dim=768", "model.n_layers=2"]
MID = ["model.dim=768", "model.ffn_dim=2048", "model.n_layers=8", "model.vocab_size=32768", "model.n_heads=12",
       "model.n_kv_heads=4"]  # about 85M parameters
CASES: dict[str, list[str]] = {
    "S none 2K": SMALL + ["data.seq_len=2048"],
    "S selective 4K": SMALL + ["data.seq_len=4096", "model.activation_checkpointing=selective"],
    "S full 4K": SMALL + ["data.seq_len=4096", "model.activation_checkpointing=full"],
    "L none 2K": SMALL + ["data.seq_len=2048", "model.layer_pattern=L", "model.linear_decay=gated"],
    "D selective 2K": SMALL + ["data.seq_len=2048", "model.layer_pattern=D", "model.activation_checkpointing=selective"],
    "LS sp2 ring 4K": SMALL + ["data.seq_len=4096", "model.layer_pattern=LS", "parallel.sp=2", "parallel.sp_method=ring"],
    "S sp2 ulysses 4K": SMALL + ["data.seq_len=4096", "parallel.sp=2"],
    "DS sp2 allgather scan 4K": SMALL + ["data.seq_len=4096", "model.layer_pattern=DS", "parallel.sp=2",
                                         "parallel.sp_method=allgather", "model.linear_sp_exchange=scan"],
    "DS sp2 allgather scan selective 2K": SMALL + ["data.seq_len=2048", "model.layer_pattern=DS", "parallel.sp=2",
                                                   "parallel.sp_method=allgather", "model.linear_sp_exchange=scan",
                                                   "model.activation_checkpointing=selective"],
    "SD sp2 allgather scan selective 2K": SMALL + ["data.seq_len=2048", "model.layer_pattern=SD", "parallel.sp=2",
                                                   "parallel.sp_method=allgather", "model.linear_sp_exchange=scan",
                                                   "model.activation_checkpointing=selective"],
    "D sp2 scan selective 2K dim 512": SMALL + ["model.dim=512", "data.seq_len=2048", "model.layer_pattern=D",
                                                "parallel.sp=2", "model.linear_sp_exchange=scan",
                                                "model.activation_checkpointing=selective"],
    "S tp2 2K": SMALL + ["data.seq_len=2048", "parallel.tp=2"],
    "S sp4 usp 8K": SMALL + ["data.seq_len=8192", "parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses_degree=2"],
    "L sp4 scan 16K": SMALL + ["data.seq_len=16384", "model.layer_pattern=L", "parallel.sp=4",
                               "model.linear_sp_exchange=scan", "model.activation_checkpointing=selective"],
    "85M S full 2K": MID + ["data.seq_len=2048", "model.activation_checkpointing=full"],
    "85M LLLS selective 4K": MID + ["data.seq_len=4096", "model.layer_pattern=LLLS",
                                    "model.activation_checkpointing=selective"],
}


STEP_BASE = SMALL + ["data.seq_len=2048", "train.global_batch=2"]
STEP_CASES: dict[str, list[str]] = {  # whole training steps through DeepSpeed, 2 ranks
    **{f"dp2 ZeRO-{z}": STEP_BASE + ["parallel.dp=2", f"train.zero_stage={z}"] for z in range(4)},
    "pp2 ZeRO-1": STEP_BASE + ["parallel.pp=2", "train.zero_stage=1"],
    "sp2 ring ZeRO-2": STEP_BASE + ["parallel.sp=2", "parallel.sp_method=ring", "train.zero_stage=2"],
}
"""Cases whose whole step (model states included) is measured: the live tensor bytes counted from before
the model is built, their peak over the second step (the first creates the optimizer's states)."""


def case_config(overrides: list[str]):
    from ithaca.launcher.config.load import load_config

    return load_config("debug-cpu", BASE + overrides)


def predicted_step_bytes(overrides: list[str]) -> int:
    """The plan's bytes one forward + backward allocates beyond weights and gradients (largest rank)."""
    terms = peak_memory(case_config(overrides))
    return sum(terms.activations.values()) + terms.loss


def predicted_sp_bytes(overrides: list[str]) -> int:
    """The plan's sequence-parallel bytes the busiest rank sends in one forward + backward."""
    by_rank = sp_bytes_by_rank(case_config(overrides)).values()
    return max(map(sum, zip(*by_rank)), default=0)


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from ithaca.bench.comm_counter import count_bytes_sent
    from ithaca.bench.peak_memory import peak_bytes
    from ithaca.data.batch import Batch
    from ithaca.data.packing import document_positions, document_starts
    from ithaca.launcher.runtime.distributed import init_distributed
    from ithaca.parallel.parallelize import parallelize_llama

    cfg = case_config(overrides)
    mesh = init_distributed(dp=1, pp=1, tp=cfg.parallel.tp, sequence=cfg.sequence).mesh
    model = parallelize_llama(cfg.model, mesh)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    n = cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, n + 1), generator=gen)
    doc_ids = (torch.arange(n) // DOC)[None]
    whole = Batch(tokens=tokens[:, :-1], labels=tokens[:, 1:], positions=document_positions(doc_ids),
                  doc_ids=doc_ids, resets=document_starts(doc_ids))
    batch = whole.part(mesh.sequence, mesh.rank("sp"))
    upstream = torch.rand(1, n // cfg.parallel.sp, generator=gen)

    def step() -> None:
        model(batch).backward(upstream)

    step()  # warm-up: first calls build lazily cached tables
    with count_bytes_sent() as counter:
        peak = torch.tensor([peak_bytes(step, "cpu"), 0])
    # the sp group's sends only (tp's all-reduces are not counted: bench/comm_counter.py patches all-to-all,
    # point-to-point, all-gather and reduce-scatter)
    peak[1] = counter.bytes_sent
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{int(peak[0])} {int(peak[1])}")
    dist.barrier()
    dist.destroy_process_group()


def _step_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from ithaca.data.batch import Batch
    from ithaca.data.packing import document_positions, document_starts
    from ithaca.launcher.runtime.distributed import init_distributed
    from ithaca.launcher.train.engine import build_engine
    from ithaca.launcher.train.live_tensors import LiveTensorBytes
    from ithaca.launcher.train.loop import train_step
    from ithaca.parallel.parallelize import parallelize_llama

    cfg = case_config(overrides)
    p = cfg.parallel
    ctx = init_distributed(dp=p.dp, pp=p.pp, tp=p.tp, sequence=cfg.sequence)
    n, rows = cfg.data.seq_len, cfg.train.micro_batch
    gen = torch.Generator().manual_seed(ctx.mesh.rank("dp"))
    doc_ids = (torch.arange(n) // DOC)[None].expand(rows, n)
    batches = []
    for _ in range(cfg.grad_accum_steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (rows, n + 1), generator=gen)
        batches.append(Batch(tokens=tokens[:, :-1], labels=tokens[:, 1:], positions=document_positions(doc_ids),
                             doc_ids=doc_ids, resets=document_starts(doc_ids)))
    with LiveTensorBytes() as counter:
        engine = build_engine(cfg, parallelize_llama(cfg.model, ctx.mesh, pp_split=None), ctx.mesh)
        train_step(engine, batches, ctx.mesh, ctx.device)
        counter.reset_peak()
        train_step(engine, batches, ctx.mesh, ctx.device)
        peak = torch.tensor([counter.peak])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(int(peak.item())))
    dist.barrier()
    dist.destroy_process_group()


def measure_step(overrides: list[str]) -> int:
    """The largest over the case's ranks of the peak live tensor bytes in a whole training step."""
    cfg = case_config(overrides)
    out = f"/tmp/bench_plan_check_step_{os.getpid()}.txt"
    mp.start_processes(_step_worker, args=(cfg.parallel.world_size, free_port(), overrides, out),
                       nprocs=cfg.parallel.world_size, start_method="spawn")
    with open(out) as f:
        peak = int(f.read())
    os.remove(out)
    return peak


def measure(overrides: list[str]) -> tuple[int, int]:
    """The largest over the case's ranks of (peak live tensor bytes, bytes sent) in one forward + backward."""
    cfg = case_config(overrides)
    world = cfg.parallel.tp * cfg.parallel.sp
    out = f"/tmp/bench_plan_check_{os.getpid()}.txt"
    mp.start_processes(_worker, args=(world, free_port(), overrides, out), nprocs=world, start_method="spawn")
    with open(out) as f:
        peak, sent = (int(word) for word in f.read().split())
    os.remove(out)
    return peak, sent


CALIBRATION_SHAPES = [  # (dim, ffn, heads, kv heads, tokens)
    (256, 768, 8, 2, 1024), (256, 1536, 8, 2, 1024), (512, 768, 8, 2, 1024), (256, 768, 8, 8, 1024),
    (256, 768, 4, 4, 1024), (256, 768, 16, 4, 1024), (256, 768, 8, 2, 2048)]


def calibrate() -> None:
    from ithaca.bench.memory import model_step_peak
    from ithaca.bench.train_setup import init_single_process

    mesh = init_single_process()
    print("| kind | mode | dim | ffn | heads | kv heads | tokens | layer elements/token | outside elements/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, mode, (dim, ffn, heads, kv, s) in itertools.product("SLD", ("none", "selective", "full"),
                                                                   CALIBRATION_SHAPES):
        two, three = (model_step_peak(mesh, kind, n, mode, s, dim, "cpu", torch.float32, heads=heads, kv_heads=kv,
                                      ffn_dim=ffn) for n in (2, 3))
        layer = (three - two) / (s * 4)
        print(f"| {kind} | {mode} | {dim} | {ffn} | {heads} | {kv} | {s} | {layer:.1f} | "
              f"{two / (s * 4) - 2 * layer:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="NAME")
    parser.add_argument("--calibrate", action="store_true", help="print the per-layer measurements instead")
    parser.add_argument("--steps", action="store_true", help="also measure whole training steps (STEP_CASES)")
    parser.add_argument("--step-cases", nargs="+", choices=list(STEP_CASES), default=list(STEP_CASES), metavar="NAME",
                        help="the whole-step cases --steps measures")
    args = parser.parse_args()
    if args.calibrate:
        print(bench_header("plan_check --calibrate", "cpu", f"fp32, one packed row, documents of {DOC} tokens"))
        calibrate()
        return
    print(bench_header("plan_check", "cpu", f"fp32, one packed row, documents of {DOC} tokens, forward + backward"))
    print("| case | ranks | predicted MiB | measured MiB (max over ranks) | predicted/measured | sp bytes predicted "
          "| sp bytes counted (max over ranks) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases:
        cfg = case_config(CASES[name])
        predicted, (measured, sent) = predicted_step_bytes(CASES[name]), measure(CASES[name])
        print(f"| {name} | {cfg.parallel.tp * cfg.parallel.sp} | {predicted / 2**20:.1f} | {measured / 2**20:.1f} | "
              f"{predicted / measured:.3f} | {predicted_sp_bytes(CASES[name])} | {sent} |", flush=True)
    if args.steps:
        print("\n| whole step | ranks | predicted MiB (buffers) | measured MiB (max over ranks) | predicted/measured |")
        print("|---|---|---|---|---|")
        for name in args.step_cases:
            overrides = STEP_CASES[name]
            cfg = case_config(overrides)
            terms = peak_memory(cfg)
            measured = measure_step(overrides)
            print(f"| {name} | {cfg.parallel.world_size} | {terms.total / 2**20:.1f} ({terms.comm_buffers / 2**20:.0f}) | "
                  f"{measured / 2**20:.1f} | {terms.total / measured:.3f} |", flush=True)


if __name__ == "__main__":
    main()
