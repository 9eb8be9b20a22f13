"""Each fused kernel against eager PyTorch, torch.compile and the installed peer, 4K to 128K tokens.

What it measures: per op and sequence length, the median time of one call, its ratio to ours
(ratio_vs_ours = candidate time / our time: above 1 is slower than ours), the achieved rate
against the device's peak, and one call's peak memory beyond its inputs (bench/peak_memory.py).
Timing (bench/timing.py): warm-up calls, then the candidates interleaved over --repeats rounds;
each sample is enough back-to-back calls to last 10 ms between two CUDA synchronizations, so
launch latency does not swamp microsecond kernels; a candidate slower than --max-call-s per call
is sampled once. Batch 1, bf16 on CUDA, fp32 on the CPU. Candidates:

  ours      the op's dispatch with impl="triton" on CUDA; impl="auto" on the CPU (its exact
            PyTorch path: interpreted Triton is not a speed path), so there ours and eager
            often run the same code
  eager     attention: F.scaled_dot_product_attention (no document mask), our tiled online
            softmax (impl="tiled") with documents; rms_norm, rope, swiglu: their reference.py;
            linear CE: F.cross_entropy((h @ W.T).float(), labels); linear attention and the
            delta rule: the chunked PyTorch form (impl="chunked"); the delta rule also its
            token recurrence (impl="reference") up to 1024 tokens, so the CPU run sets the
            chunked form against the spec
  compile   torch.compile(dynamic=False) of the eager form, with two exceptions. With documents
            it is flex_attention with a document block mask: the tiled form syncs with the host
            per tile, which dynamo cannot trace into one graph. Linear attention is compiled up
            to 16 chunks (1K tokens; never at the CUDA lengths): dynamo unrolls the chunked
            form's loop, one body per chunk, and compile time grows with them. On the CPU a
            compile that fails prints "skipped: compile failed on the CPU: <error>"
            (flex_attention has no CPU backward); --no-compile leaves compilation out (inductor
            builds C++ on the CPU: about 25 s of the default CPU run with a cold cache). The
            delta rule has none: its chunked form loops over chunks as linear attention's does,
            so under the same 16-chunk cap it would run only at the CPU's toy sizes
  peers     flash-attn 2 (flash_attn_func; flash_attn_varlen_func with documents), liger-kernel
            (rms_norm, fused add + rms_norm, rope, swiglu, fused linear cross-entropy),
            cut-cross-entropy, fla (chunk_retention, chunk_simple_gla, chunk_gla,
            chunk_gated_delta_rule); each called with our semantics (see the functions in
            bench/kernel_jobs.py); a peer that is not importable, or off CUDA, prints
            "skipped: <why>"

Work per call (b = 1; e = bytes per element; fwd+bwd counts the useful work, not recomputation):

  attention           fwd 4*h*d*s*s/2 FLOPs causal; with documents of D tokens 4*h*d*s*D/2
                      (each document is causal over itself); fwd+bwd 3.5x fwd (the backward's
                      five matmuls are 2.5x the forward's two, flash-attn's convention)
  linear attention    fwd s*h*(2*C*(d_k + d_v) + 4*d_k*d_v) FLOPs, C = 64 (within-chunk scores
                      and their product with v counted as full C x C blocks, as chunked kernels
                      compute them; the state read and the state update); fwd+bwd 3x fwd
  delta rule          fwd s*h*(2*C*(3*d_k + 2*d_v) + 6*d_k*d_v) FLOPs, C = 64 (fla's chunk and
                      our chunked path's; our Triton kernels' chunk is 32, which does less
                      within-chunk work, but the count is one for all): within the chunk K K^T,
                      the UT transform's T applied to K and V, Q K^T and its product with the
                      deltas; per token the state read for the deltas, for the output and the
                      state update; fwd+bwd 3x fwd
  linear CE           fwd 2*n*V*d FLOPs; fwd+bwd 6*n*V*d (dhidden and dweight are two more matmuls)
  rms_norm            fwd+bwd 5*n*D*e bytes: read x, write y; read x and dy, write dx
  rms_norm+residual   fwd+bwd 8*n*D*e: read x and r, write y and s; read dy, ds and s, write dx
                      (= dresidual, written once)
  rope                fwd+bwd 4*n*(h + h_kv)*d*e: read and write q and k, then dq and dk
  swiglu              fwd+bwd 8*n*F*e: read gate and up, write y; read dy, gate and up, write both grads

Weights, positions, gates and statistics (O(n) or O(D)) are left out of the byte counts. The
peak is the H100/H200 SXM's: 989 TFLOP/s dense bf16, 3.35 TB/s (H100) or 4.8 TB/s (H200) HBM;
"-" on any other device. Only the sequence mixers are also timed forward alone (under no_grad,
as evaluation runs them); the other ops always run with their backward in training.

Never run on a GPU yet: bench/gpu_check.sh runs it on an H100. The CPU run only keeps the
script alive (toy sizes, under a minute on 2 cores); its times are not figures.

Run:  python -m ithaca.bench.kernels --device cuda [--ops attention swiglu] [--lengths 4096 16384] [--repeats 5]
      python -m ithaca.bench.kernels --device cpu  [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import sys

# Inductor's C++ kernels and ATen each keep an OpenMP thread pool, and idle threads of one spin
# on the cores the other needs: interleaved with compiled calls on 2 cores, a 3 ms eager call
# took 900 ms. Read when torch loads OpenMP, so set before the import; CUDA timings are unaffected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from ithaca.bench.header import bench_header, device_peaks
from ithaca.bench.kernel_jobs import OPS, SIZES, Env, Job, Sizes, jobs_for
from ithaca.bench.timing import Outcome, time_candidates

MIN_SAMPLE_S = 0.01
"""Each timed sample repeats a call back to back until it lasts this long (bench/timing.py)."""
MIB = 2**20
def _number(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _rows(job: Job, outcomes: list[Outcome], repeats: int, peaks: tuple[float, float] | None) -> list[str]:
    ours = outcomes[0].median_s
    rows = []
    for outcome in outcomes:
        t = outcome.median_s
        if t is None:
            cells = [outcome.status or "no timing", "-", "-", "-", "-"]
        else:
            rate = job.work / t
            achieved = f"{_number(rate / 1e12)} TFLOP/s" if job.unit == "flop" else f"{_number(rate / 1e9)} GB/s"
            peak = None if peaks is None else peaks[0 if job.unit == "flop" else 1]
            samples = "" if len(outcome.times) == repeats else f" ({len(outcome.times)} of {repeats} samples: slow)"
            cells = [f"{t * 1e3:.3f}{samples}", "-" if ours is None else f"{t / ours:.2f}", achieved,
                     "-" if peak is None else f"{rate / peak:.3f}",
                     "-" if outcome.peak is None else f"{outcome.peak / MIB:.1f}"]
        rows.append(f"| {job.op} | {job.shape} | {job.passes} | {outcome.name} | {' | '.join(cells)} |")
    return rows


def _time_op(op: str, s: int, env: Env, repeats: int, max_call_s: float,
             peaks: tuple[float, float] | None) -> list[str]:
    """Print the rows of op at length s; returns the jobs where ours failed."""
    failed = []
    for job in jobs_for(op, s, env):
        outcomes = time_candidates(job.candidates, env.device, repeats, max_call_s, MIN_SAMPLE_S)
        print("\n".join(_rows(job, outcomes, repeats, peaks)), flush=True)
        if (outcomes[0].status or "").startswith("failed"):  # OOM is a finding, not a broken script
            failed.append(f"{job.op} {job.shape} {job.passes}")
    return failed  # the jobs' inputs die here, before the next length's are made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to time (default: all)")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="sequence lengths in tokens (default: 4096 16384 65536 131072 on cuda, 256 1024 on cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up; medians are printed")
    parser.add_argument("--doc-len", type=int, help="packed document length (default: 2048 on cuda, 64 on cpu)")
    parser.add_argument("--max-call-s", type=float, default=5.0,
                        help="a candidate whose call takes longer is sampled once (its median is over fewer samples)")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile candidates out")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.repeats < 1 or (args.doc_len is not None and args.doc_len < 1):
        parser.error("--repeats and --doc-len must be >= 1")
    sizes = SIZES[args.device]
    if args.doc_len:
        sizes = Sizes(**{**sizes.__dict__, "doc_len": args.doc_len})
    env = Env(device=args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32, sizes=sizes,
              compile=not args.no_compile)
    # timings without the NaN fill of new outputs that kernel tests ask for (bench/gpu_check.sh exports it)
    os.environ.pop("ITHACA_POISON", None)
    if env.compile:  # one compiled function meets every length twice (with and without grad): past dynamo's 8
        torch._dynamo.config.recompile_limit = 64
    peaks = device_peaks(args.device)
    lengths = args.lengths or list(sizes.lengths)
    print(bench_header("kernels", args.device,
                       f"dtype={str(env.dtype).removeprefix('torch.')} ours=impl={env.ours} batch=1 "
                       f"heads={sizes.heads}/{sizes.kv_heads} head_dim={sizes.head_dim} doc_len={sizes.doc_len} "
                       f"hidden={sizes.hidden} ffn={sizes.ffn} vocab={sizes.vocab} repeats={args.repeats} "
                       f"min_sample_ms={MIN_SAMPLE_S * 1e3:.0f} max_call_s={args.max_call_s:g} "
                       f"peak={'-' if peaks is None else f'{peaks[0] / 1e12:.0f}TFLOP/s,{peaks[1] / 1e12:.2f}TB/s'}"))
    print("| op | shape | pass | candidate | median ms | ratio_vs_ours | achieved | of peak | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    ours_failed = [failed for op in args.ops for s in lengths
                   for failed in _time_op(op, s, env, args.repeats, args.max_call_s, peaks)]
    if ours_failed:
        print(f"ours failed in: {'; '.join(ours_failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
