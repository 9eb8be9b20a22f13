"""Ring vs Ulysses vs USP vs LASP-2 and the delta rule (all-gather, scan): one mixing layer's forward+backward
per rank, time and bytes.

What it measures: for each (N, P), every method runs the same [1, N, h, d] causal layer split
over P ranks (Ulysses contiguous, ring zigzag, USP both; LASP-2 is linear attention with a fixed
decay on the same q, k, v, contiguous, its states all-gathered or scanned; "delta" is the gated
delta rule with the same decay, L2-normed k and sigmoid beta, contiguous, its (A, B) pairs
all-gathered or its states scanned), after a warm-up, the methods interleaved over repeats; it
prints the median time, the ratio to Ulysses, and the most bytes any rank sent (counted at
torch.distributed) beside the formula for them (computed by launcher/plan/traffic.py, which `ithaca plan` uses):

    Ulysses  2 passes x (2h + 2h_kv') * b*(N/P)*d * (P-1)/P elements      (h_kv' = max(h_kv, P))
    ring     forward (P-1) * 2*b*(N/P)*h_kv*d; backward the same again plus P * 2*b*(N/P)*h_kv*d
             fp32 gradient accumulators
    USP      Ulysses over U ranks on the local part, then the ring over R = P/U groups on
             [b, N/R, h/U, d]
    LASP-2   all-gather of fp32 states and carries (P-1) * b*h*(d*d + 1), and a reduce-scatter
             of their gradients, the same again: independent of N
    scan     fp32 states to the next rank forward, their gradients to the previous one backward:
             b*h*d*d each way, so one state (P = 2) or two (inner ranks, P > 2): independent of N and P
    delta    all-gather of fp32 pairs (P-1) * b*h*d*(d + d) (A is d x d, B d x d_v), and a
             reduce-scatter of their gradients, the same again: independent of N
    delta-scan  as scan: only states travel, A stays on its rank

Run:  python -m ithaca.bench.sp_attention --device cpu            (gloo processes on this machine)
      python -m ithaca.bench.sp_attention --device cuda --world 8  (nccl, one process per GPU)
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
from ithaca.launcher.plan.traffic import (LayerShape, ring_part_bytes, scan_bytes, state_allgather_bytes,
                                          ulysses_bytes, usp_inner_shape)

HEADS, KV_HEADS, HEAD_DIM = 8, 8, 64


def _bytes_formula(method: str, n: int, world: int, ring: int, elem: int) -> int:
    """The most bytes any rank sends in the layer's forward + backward, by launcher/plan/traffic.py."""
    x = LayerShape(b=1, n=n, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, elem=elem)
    if method in ("lasp2", "delta"):
        sends = [state_allgather_bytes(x, world, ring=1, kind="L" if method == "lasp2" else "D")]
    elif method in ("lasp2-scan", "delta-scan"):
        sends = scan_bytes(x, world, ring=1)
    elif method == "ulysses":
        sends = [ulysses_bytes(x, world)]
    else:  # ring, or usp: Ulysses over world // ring ranks inside each ring rank's group first
        ulysses = world // ring
        inner = [ulysses_bytes(usp_inner_shape(x, ring), ulysses)] if ulysses > 1 else []
        sends = inner + [ring_part_bytes(x, world, ring, document_mask=False)]
        return sum(part.total(recomputed=False) for part in sends)
    return max(part.total(recomputed=False) for part in sends)


def _methods(world: int) -> dict[str, int]:
    """method -> ring size."""
    methods = {"ulysses": 1, "ring": world}
    if world >= 4:
        methods["usp"] = 2
    methods["lasp2"] = 1
    methods["lasp2-scan"] = 1
    methods["delta"] = 1
    methods["delta-scan"] = 1
    return methods


def _worker(rank: int, world: int, port: int, device: str, lengths: list[int], repeats: int, table: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR=device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    from ithaca.bench.comm_counter import count_bytes_sent
    from ithaca.models.linear_attention import retention_log_decay
    from ithaca.parallel import (SequenceLayout, build_mesh, delta_rule_attention, lasp2_attention, ulysses_attention,
                                 usp_attention)

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layouts = {1: SequenceLayout(sp=world), world: SequenceLayout(sp=world, sp_method="ring")}
    layouts |= {ring: SequenceLayout(sp=world, sp_method="usp", ulysses_degree=world // ring)
                for ring in set(_methods(world).values()) - set(layouts)}
    meshes = {ring: build_mesh(dp=1, pp=1, tp=1, device_type=device, sequence=layouts[ring])
              for ring in set(_methods(world).values())}
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(1, n, h, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)]
        full_beta = torch.sigmoid(torch.randn(1, n, HEADS, generator=gen))  # the delta rule's write strength
        times: dict[str, list[float]] = {m: [] for m in _methods(world)}
        sent: dict[str, int] = {}
        for repeat in range(repeats + 1):  # repeat 0 warms up
            for method, ring in _methods(world).items():
                mesh = meshes[ring]
                q, k, v, dout = (mesh.sequence.part(t, mesh.rank("sp")).to(device, dtype)
                                 for t in full)
                q, k, v = (t.requires_grad_() for t in (q, k, v))
                dist.barrier()
                start = time.perf_counter()
                with count_bytes_sent() as counter:
                    if method.startswith("delta"):
                        beta = mesh.sequence.part(full_beta, mesh.rank("sp")).to(device, dtype)
                        exchange = "scan" if method == "delta-scan" else "allgather"
                        out = delta_rule_attention(q, torch.nn.functional.normalize(k, dim=-1), v,
                                                   beta.requires_grad_(), mesh.group("sp"), exchange=exchange,
                                                   log_decay=retention_log_decay(HEADS).to(device))
                    elif method.startswith("lasp2"):
                        exchange = "scan" if method == "lasp2-scan" else "allgather"
                        out = lasp2_attention(q, k, v, mesh.group("sp"), exchange=exchange,
                                              log_decay=retention_log_decay(HEADS).to(device))
                    elif ring == 1:
                        out = ulysses_attention(q, k, v, mesh.group("sp"))
                    else:
                        out = usp_attention(q, k, v, mesh.group("ulysses"), mesh.group("ring"))
                    out.backward(dout)
                if device == "cuda":
                    torch.cuda.synchronize()
                if repeat:
                    times[method].append(time.perf_counter() - start)
                    sent[method] = counter.bytes_sent
        for method in sent:  # the scan's ranks differ (the ends have one neighbour): report the busiest
            busiest = torch.tensor([sent[method]], device=device)
            dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=meshes[1].group("sp"))
            sent[method] = int(busiest.item())
        base = statistics.median(times["ulysses"])
        for method, ring in _methods(world).items():
            t = statistics.median(times[method])
            formula = _bytes_formula(method, n, world, ring, torch.tensor([], dtype=dtype).element_size())
            rows.append(f"| {n} | {world} | {method} | {t * 1e3:.1f} | {t / base:.2f} | {sent[method]} | "
                        f"{formula} | {sent[method] / formula:.3f} |")
    if rank == 0:
        with open(table, "w") as f:
            f.write("\n".join(rows) + "\n")
    # Every rank done with every exchange before any leaves: a rank whose gloo peer exited first was
    # seen aborting (SIGABRT) at teardown, once in a full suite run.
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="sequence-parallel sizes P")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="sequence lengths N")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import deepspeed

    backend = "nccl" if args.device == "cuda" else "gloo"
    print(bench_header("sp_attention", args.device, f"backend={backend} deepspeed={deepspeed.__version__} "
                       f"heads={HEADS} kv_heads={KV_HEADS} head_dim={HEAD_DIM} batch=1 causal"))
    print("| N | P | method | fwd+bwd ms (median) | ratio_vs_ulysses | bytes sent/rank (max) | formula "
          "| measured/formula |")
    print("|---|---|---|---|---|---|---|---|")
    for world in args.world:
        out = f"/tmp/bench_sp_attention_{os.getpid()}_{world}.md"
        port = free_port()
        mp.start_processes(_worker, args=(world, port, args.device, args.lengths, args.repeats, out), nprocs=world,
                           start_method="spawn")
        with open(out) as f:
            print(f.read(), end="")
        os.remove(out)


if __name__ == "__main__":
    main()
