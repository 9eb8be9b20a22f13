"""Peak memory, measured: two ops whose plain forms are quadratic or [tokens x vocab]; a layer per recompute mode.

(a) One ring block with packed documents: attention_lse_fwd + attention_lse_bwd, causal, one
    batch row, documents of DOC tokens, at s = 2K, 4K, 8K. "auto" (the tiled online softmax on
    the CPU, our Triton kernel on CUDA) against the dense reference, which holds [h, s, s] fp32
    scores. `x_prev` is the growth per doubling of s: 2 is linear, 4 quadratic.
(b) linear_cross_entropy (auto: chunked on the CPU, Triton-fused blocks on CUDA) against
    F.cross_entropy(hidden @ W.T), forward + backward, at n = 8K tokens, V = 32K. Target: ours
    at most 10% of the naive peak.
(c) Activation memory per layer under model.activation_checkpointing none, full and selective:
    the whole model, forward + backward, one row of s tokens in documents of DOC tokens, with 2
    and 3 layers of one kind; peak(3) - peak(2) is one layer's activations: the embedding, head
    and loss are the same in both, gradients are allocated before the call (they accumulate in
    place), and from 2 layers on the backward peaks at the same place in both stacks (from 1 to
    2 it does not: the first block has no residual input and under full recompute the peak
    moves). Softmax layers (Llama) and gated linear layers (GLA decay); a hybrid's layer is one
    of the two, so an LS hybrid's per-layer figure is their mean (checked once: an LS stack's
    (peak(4) - peak(2)) / 2 at the default size matched it to 0.1 MiB in every mode).

Peak = bytes allocated during the call beyond its inputs (bench/peak_memory.py): CUDA allocator
statistics on a GPU, live tensor bytes counted at the dispatcher on the CPU.

Run:  python -m ithaca.bench.memory --device cpu        (about 90 s on 2 cores, 60 s of it part (c))
      python -m ithaca.bench.memory --device cuda
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ithaca.bench.header import bench_header
from ithaca.bench.peak_memory import peak_bytes
from ithaca.bench.train_setup import init_single_process
from ithaca.data.batch import Batch
from ithaca.data.packing import document_positions, document_starts
from ithaca.kernels import attention_lse_bwd, attention_lse_fwd, linear_cross_entropy
from ithaca.models.llama_args import LlamaArgs
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.parallelize import parallelize_llama

HEADS, KV_HEADS, HEAD_DIM, DOC = 8, 2, 64, 1024
MIB = 2**20
LAYER_KINDS = {"softmax (Llama)": "S", "linear, gated (hybrid's L)": "L"}
"""Part (c)'s layers: name -> layer_pattern, each measured in stacks of 2 and 3 such layers."""
MODES = ("none", "full", "selective")


def ring_block(s: int, impl: str, device: str, dtype: torch.dtype) -> int:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, HEADS, HEAD_DIM, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, s, KV_HEADS, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(2))
    dout = torch.randn_like(q)
    docs = (torch.arange(s, device=device) // DOC)[None]
    masks = dict(is_causal=True, scale=HEAD_DIM ** -0.5, q_doc_ids=docs, k_doc_ids=docs, impl=impl)

    def step() -> None:
        out, lse = attention_lse_fwd(q, k, v, **masks)
        attention_lse_bwd(dout, q, k, v, out, lse, **masks)

    return peak_bytes(step, device)


def cross_entropy(n: int, vocab: int, dim: int, impl: str, device: str, dtype: torch.dtype) -> int:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    upstream = torch.rand(n, generator=gen).to(device)

    def step() -> None:
        if impl == "naive":
            losses = F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none")
        else:
            losses = linear_cross_entropy(hidden, weight, labels, impl=impl)
        losses.backward(upstream)

    return peak_bytes(step, device)


def model_step_peak(mesh: ParallelMesh, pattern: str, n_layers: int, mode: str, s: int, dim: int,
                    device: str, dtype: torch.dtype, *, heads: int = HEADS, kv_heads: int = KV_HEADS,
                    ffn_dim: int | None = None) -> int:
    """Peak bytes of one forward + backward of a `n_layers` model of `pattern` layers under
    activation_checkpointing=`mode`: one row of s tokens, documents of DOC tokens (ffn_dim: 3 dim
    unless given)."""
    args = LlamaArgs(vocab_size=320, dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads,
                     ffn_dim=ffn_dim or 3 * dim,
                     layer_pattern=pattern, linear_decay="gated", activation_checkpointing=mode)
    model = parallelize_llama(args, mesh, dtype=dtype).to(device)
    for p in model.parameters():  # allocated before the call: the backward adds into them in place
        p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, s + 1), generator=gen).to(device)
    doc_ids = (torch.arange(s, device=device) // DOC)[None]  # [1, s]
    batch = Batch(tokens=tokens[:, :-1], labels=tokens[:, 1:], positions=document_positions(doc_ids), doc_ids=doc_ids,
                  resets=document_starts(doc_ids))
    upstream = torch.rand(1, s, generator=gen).to(device)

    def step() -> None:
        model(batch).backward(upstream)

    return peak_bytes(step, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192], help="ring block lengths s")
    parser.add_argument("--tokens", type=int, default=8192, help="linear-CE tokens n")
    parser.add_argument("--vocab", type=int, default=32768, help="linear-CE vocabulary V")
    parser.add_argument("--dim", type=int, default=512, help="linear-CE hidden size d")
    parser.add_argument("--layer-seq", type=int, default=4096, help="part (c): tokens in the one packed row")
    parser.add_argument("--layer-dim", type=int, default=512,
                        help=f"part (c): model width ({HEADS} heads, {KV_HEADS} kv heads, ffn 3x)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(bench_header("memory", args.device, f"dtype={str(dtype).removeprefix('torch.')} heads={HEADS} "
                       f"kv_heads={KV_HEADS} head_dim={HEAD_DIM} doc_len={DOC}"))
    print("\n(a) one document-masked ring block, forward + backward\n")
    print("| s | impl | peak MiB | x_prev (2 = linear) | ratio_vs_reference |")
    print("|---|---|---|---|---|")
    previous: dict[str, int] = {}
    for s in args.lengths:
        peaks = {impl: ring_block(s, impl, args.device, dtype) for impl in ("reference", "auto")}
        for impl, peak in peaks.items():
            growth = f"{peak / previous[impl]:.2f}" if impl in previous else "-"
            print(f"| {s} | {impl} | {peak / MIB:.1f} | {growth} | {peak / peaks['reference']:.3f} |")
        previous = peaks
    print(f"\n(b) linear cross-entropy, forward + backward, n={args.tokens} V={args.vocab} d={args.dim}\n")
    print("| impl | peak MiB | ratio_vs_naive |")
    print("|---|---|---|")
    naive = cross_entropy(args.tokens, args.vocab, args.dim, "naive", args.device, dtype)
    ours = cross_entropy(args.tokens, args.vocab, args.dim, "auto", args.device, dtype)
    print(f"| naive F.cross_entropy(h @ W.T) | {naive / MIB:.1f} | 1.000 |")
    print(f"| linear_cross_entropy (auto) | {ours / MIB:.1f} | {ours / naive:.3f} |")
    s, dim = args.layer_seq, args.layer_dim
    stream = s * dim * torch.finfo(dtype).bits // 8  # one [1, s, dim] activation
    print(f"\n(c) activation memory per layer, forward + backward of the model, s={s} dim={dim} ffn={3 * dim} "
          f"(one [1, s, dim] stream = {stream / MIB:.1f} MiB)\n")
    print("| layer | activation_checkpointing | MiB per layer | streams per layer | ratio_vs_none |")
    print("|---|---|---|---|---|")
    mesh = init_single_process()
    per_layer: dict[str, dict[str, float]] = {}
    for name, pattern in LAYER_KINDS.items():
        per_layer[name] = {}
        for mode in MODES:
            two, three = (model_step_peak(mesh, pattern, n, mode, s, dim, args.device, dtype) for n in (2, 3))
            per_layer[name][mode] = three - two
    per_layer["hybrid LS (mean of the two)"] = {mode: sum(kind[mode] for kind in per_layer.values()) / 2
                                                for mode in MODES}
    for name, peaks in per_layer.items():
        for mode, peak in peaks.items():
            print(f"| {name} | {mode} | {peak / MIB:.1f} | {peak / stream:.2f} | {peak / peaks['none']:.3f} |")


if __name__ == "__main__":
    main()
