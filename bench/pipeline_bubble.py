"""Pipeline bubble: the measured idle fraction of each stage under DeepSpeed's 1F1B schedule.

What it measures: the debug Llama made deeper (model.n_layers = LAYERS, every stage the same
number of blocks) trains STEPS steps of M micro-batches each under pp = P (launcher's own
train_step, so the real pipeline path runs); per stage it times the forward and backward passes
the schedule runs (DeepSpeed's `_exec_forward_pass` / `_exec_backward_pass`, wrapped on the engine
instance) and the whole step. The idle fraction is 1 - busy / step, where the step excludes the
optimizer update (every stage runs that at the same time); the part of it spent inside the
blocking activation/gradient sends and receives (where a stage waits for its neighbour) is shown
beside it. Beside it is the 1F1B bound
(P - 1) / (M + P - 1) for stages of equal cost; the first warm-up step is not counted.

On the CPU machine the P processes share 2 cores, so a waiting stage lends its core to a busy one
and "busy" time stretches: read the CPU rows as a check that the schedule overlaps stages as
1F1B should, not as GPU figures.

Run:  python -m ithaca.bench.pipeline_bubble --device cpu --pp 2 4            (gloo processes here)
      python -m ithaca.bench.pipeline_bubble --device cuda --pp 2 4 --dim 2048  (one process per GPU)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ithaca.bench.header import bench_header
from ithaca.bench.rendezvous import free_port

STEPS, LAYERS = 4, 8
P2P = ("_exec_send_activations", "_exec_recv_activations", "_exec_send_grads", "_exec_recv_grads")


def _time_instructions(engine, spent: dict[str, float]) -> None:
    """Time the schedule's instructions named in `spent` (the engine runs each through its class's
    _INSTRUCTION_MAP; an instance copy with timed entries shadows it)."""
    def timed(inner):
        def run(self, **kwargs):
            start = time.perf_counter()
            try:
                return inner(self, **kwargs)
            finally:
                spent[inner.__name__] += time.perf_counter() - start
        return run

    engine._INSTRUCTION_MAP = {cmd: timed(fn) if fn.__name__ in spent else fn
                               for cmd, fn in type(engine)._INSTRUCTION_MAP.items()}


def _worker(rank: int, world: int, port: int, device: str, micro: int, dim: int, seq: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR=device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from ithaca.data.batch import Batch
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.runtime.distributed import init_distributed
    from ithaca.launcher.train.engine import build_engine
    from ithaca.launcher.train.loop import train_step
    from ithaca.parallel.parallelize import parallelize_llama

    cfg = load_config("debug-cpu", [
        "data.path=unused", "parallel.dp=1", f"parallel.pp={world}", f"model.n_layers={LAYERS}",
        f"model.dim={dim}", f"model.ffn_dim={3 * dim}", f"data.seq_len={seq}", "train.micro_batch=1",
        f"train.global_batch={micro}", f"train.steps={STEPS}"])
    mesh = init_distributed(dp=1, pp=world, tp=1).mesh
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    model = parallelize_llama(cfg.model, mesh, seed=0, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    engine = build_engine(cfg, model, mesh)
    spent = dict.fromkeys(("_exec_forward_pass", "_exec_backward_pass", "_exec_optimizer_step", *P2P), 0.0)
    _time_instructions(engine, spent)
    gen = torch.Generator().manual_seed(0)
    idle = []
    for step in range(STEPS + 1):
        batches = [Batch.from_window(torch.randint(0, cfg.model.vocab_size, (1, seq + 1), generator=gen), eos_id=None)
                   for _ in range(micro)]
        for name in spent:
            spent[name] = 0.0
        dist.barrier()
        start = time.perf_counter()
        train_step(engine, batches, mesh, dev)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start - spent["_exec_optimizer_step"]
        busy = spent["_exec_forward_pass"] + spent["_exec_backward_pass"]
        p2p = sum(spent[name] for name in P2P)
        if step:  # the first step warms up
            idle.append((1 - busy / wall, p2p / wall))
    rows = [None] * world
    dist.all_gather_object(rows, tuple(statistics.median(column) for column in zip(*idle)))
    if rank == 0:
        bound = (world - 1) / (micro + world - 1)
        with open(out, "a") as table:
            for stage, (fraction, in_p2p) in enumerate(rows):
                table.write(f"| {world} | {micro} | {stage} | {fraction:.3f} | {in_p2p:.3f} | {bound:.3f} |\n")
    dist.barrier()  # no rank tears gloo down while another still talks to it (a rank once aborted so)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline degrees (processes)")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (M)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < max(args.pp):
        parser.error(f"--device cuda --pp {max(args.pp)}: needs that many GPUs; use --device cpu")
    print(bench_header("pipeline_bubble", args.device, f"layers={LAYERS} dim={args.dim} seq={args.seq} "
                       f"micro_batches={args.micro_batches} steps={STEPS}"))
    print("| pp | micro-batches | stage | idle fraction (measured) | of which in send/recv | 1F1B bound (P-1)/(M+P-1) |")
    print("|---|---|---|---|---|---|")
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pipeline_bubble_{os.getpid()}.md")
    for world in args.pp:
        port = free_port()
        mp.start_processes(_worker, args=(world, port, args.device, args.micro_batches, args.dim, args.seq, out),
                           nprocs=world, start_method="spawn")
    with open(out) as table:
        print(table.read(), end="")
    os.remove(out)


if __name__ == "__main__":
    main()
