"""Training throughput of a shipped model on one device: tokens/s and MFU, model.kernels auto vs reference.

What it measures: the model of each config (llama-1b-32k and hybrid-1b-128k on CUDA; the debug
configs at toy size on the CPU) in one process, tp = sp = 1, bf16 on CUDA (fp32 on the CPU), a
plain AdamW step (no DeepSpeed: what is timed is the model's forward, backward and the update),
random tokens packed into documents of --doc-len tokens, --seq-len tokens per step. The configs'
own 32K / 128K lengths are spread over 8 GPUs by sequence parallelism; on one GPU the length is
what fits. After --warmup steps of each, the two kernel settings alternate step by step for
--steps steps; medians are printed. A setting that runs out of memory prints OOM.

    MFU = (6 N + 12 L H Q T) * tokens/s / peak      (PaLM, arXiv:2204.02311, appendix B)

N = parameters outside the input embedding (a tied one counts: it is the output projection too),
L = softmax layers, H heads, Q head dim, T the sequence length; linear-attention layers' state
work is not counted (MFU is an underestimate for hybrids). Peak = the device's dense bf16 rate
(H100/H200 SXM: 989 TFLOP/s; other devices print "-"). The formula and the peak table are the
training loop's own (launcher/train/metrics.py).

Run:  python -m ithaca.bench.train_throughput --device cuda [--seq-len 8192]
      python -m ithaca.bench.train_throughput --device cpu          (toy size; a test keeps it running)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from ithaca.bench.header import bench_header, device_peaks
from ithaca.bench.train_setup import build_model, init_single_process
from ithaca.data.batch import Batch
from ithaca.launcher.train.metrics import flops_per_token, mfu


def _batch(vocab: int, seq_len: int, doc_len: int, device: str) -> Batch:
    """Random tokens in documents of `doc_len` tokens (no EOS in the draw: the documents are cut by length)."""
    from ithaca.data.packing import document_starts

    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, vocab, (1, seq_len + 1), generator=gen)
    doc_ids = (torch.arange(seq_len) // doc_len)[None]
    return Batch(tokens=window[:, :-1], labels=window[:, 1:], positions=(torch.arange(seq_len) % doc_len)[None],
                 doc_ids=doc_ids, resets=document_starts(doc_ids)).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", help="default: llama-1b-32k hybrid-1b-128k (cuda), the debug ones (cpu)")
    parser.add_argument("--seq-len", type=int, help="tokens per step (default: 8192 on cuda, 128 on cpu)")
    parser.add_argument("--doc-len", type=int, help="packed document length (default: seq_len / 4)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    if args.device == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a machine with a GPU: the process group would be nccl; hide the GPU "
                     "(CUDA_VISIBLE_DEVICES=) or use --device cuda")
    cuda = args.device == "cuda"
    configs = args.configs or (["llama-1b-32k", "hybrid-1b-128k"] if cuda else ["debug-cpu", "debug-hybrid-cpu"])
    seq_len = args.seq_len or (8192 if cuda else 128)
    doc_len = args.doc_len or max(1, seq_len // 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    peaks = device_peaks(args.device)
    peak = None if peaks is None else peaks[0]
    mesh = init_single_process()
    print(bench_header("train_throughput", args.device, f"dtype={str(dtype).removeprefix('torch.')} "
                       f"seq_len={seq_len} doc_len={doc_len} steps={args.steps} warmup={args.warmup} "
                       f"peak={'-' if peak is None else f'{peak / 1e12:.0f}TFLOP/s'}"))
    print("| config | kernels | tokens/s (median) | ratio_vs_reference | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        runs = {}
        for kernels in ("auto", "reference"):
            runs[kernels] = _Run(mesh, config, kernels, args.device, dtype, seq_len, doc_len)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for step in range(args.warmup + args.steps):
            for kernels, run in runs.items():
                seconds = run.step()
                if step >= args.warmup and seconds is not None:
                    times[kernels].append(seconds)
        ref = statistics.median(times["reference"]) if times["reference"] else None
        for kernels, run in runs.items():
            if not times[kernels]:
                print(f"| {config} | {kernels} | OOM | - | - | - |")
                continue
            t = statistics.median(times[kernels])
            utilization = "-" if peak is None else f"{mfu(run.flops_per_token, seq_len / t, peak):.3f}"
            ratio = "-" if ref is None else f"{ref / t:.2f}"
            peak_gib = "-" if run.peak_gib is None else f"{run.peak_gib:.1f}"  # CUDA allocator only
            print(f"| {config} | {kernels} | {seq_len / t:.0f} | {ratio} | {utilization} | {peak_gib} |")
        del runs
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()  # no rank tears gloo down while another still talks to it (a rank once aborted so)
    dist.destroy_process_group()


class _Run:
    """One model and optimizer; `step()` -> seconds, or None once it has run out of memory."""

    def __init__(self, mesh, config: str, kernels: str, device: str, dtype: torch.dtype, seq_len: int,
                 doc_len: int):
        self.device = device
        self.model, self.args = build_model(mesh, config, kernels, device, dtype)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.batch = _batch(self.args.vocab_size, seq_len, doc_len, device)
        self.flops_per_token = flops_per_token(self.args, seq_len)
        self.failed = False
        self.peak_gib: float | None = 0.0 if device == "cuda" else None

    def step(self) -> float | None:
        if self.failed:
            return None
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            loss = self.model(self.batch).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device == "cuda":
                torch.cuda.synchronize()
        except torch.OutOfMemoryError:
            self.failed = True
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.device == "cuda":
            self.peak_gib = max(self.peak_gib, torch.cuda.max_memory_allocated() / 2**30)
        return time.perf_counter() - start


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    main()
