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
            linear CE: F.cross_entropy((h @ W.T).float(), labels); linear attention: the
            chunked PyTorch form (impl="chunked")
  compile   torch.compile(dynamic=False) of the eager form, with two exceptions. With documents
            it is flex_attention with a document block mask: the tiled form syncs with the host
            per tile, which dynamo cannot trace into one graph. Linear attention is compiled up
            to 16 chunks (1K tokens; never at the CUDA lengths): dynamo unrolls the chunked
            form's loop, one body per chunk, and compile time grows with them. On the CPU a
            compile that fails prints "skipped: compile failed on the CPU: <error>"
            (flex_attention has no CPU backward); --no-compile leaves compilation out (inductor
            builds C++ on the CPU: about 25 s of the default CPU run with a cold cache)
  peers     flash-attn 2 (flash_attn_func; flash_attn_varlen_func with documents), liger-kernel
            (rms_norm, fused add + rms_norm, rope, swiglu, fused linear cross-entropy),
            cut-cross-entropy, fla (chunk_retention, chunk_simple_gla, chunk_gla); each called
            with our semantics (see the functions below); a peer that is not importable, or
            off CUDA, prints "skipped: <why>"

Work per call (b = 1; e = bytes per element; fwd+bwd counts the useful work, not recomputation):

  attention           fwd 4*h*d*s*s/2 FLOPs causal; with documents of D tokens 4*h*d*s*D/2
                      (each document is causal over itself); fwd+bwd 3.5x fwd (the backward's
                      five matmuls are 2.5x the forward's two, flash-attn's convention)
  linear attention    fwd s*h*(2*C*(d_k + d_v) + 4*d_k*d_v) FLOPs, C = 64 (within-chunk scores
                      and their product with v counted as full C x C blocks, as chunked kernels
                      compute them; the state read and the state update); fwd+bwd 3x fwd
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

Run:  python -m bench.kernels --device cuda [--ops attention swiglu] [--lengths 4096 16384] [--repeats 5]
      python -m bench.kernels --device cpu  [--no-compile]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal

# Inductor's C++ kernels and ATen each keep an OpenMP thread pool, and idle threads of one spin
# on the cores the other needs: interleaved with compiled calls on 2 cores, a 3 ms eager call
# took 900 ms. Read when torch loads OpenMP, so set before the import; CUDA timings are unaffected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from bench.header import bench_header
from bench.timing import Candidate, Outcome, time_candidates
from ithaca.kernels.attention import attention
from ithaca.kernels.linear_attention import linear_attention
from ithaca.kernels.linear_attention.chunked import linear_attention_chunked
from ithaca.kernels.linear_cross_entropy import linear_cross_entropy
from ithaca.kernels.rms_norm import rms_norm
from ithaca.kernels.rms_norm.reference import rms_norm_reference
from ithaca.kernels.rope import rope
from ithaca.kernels.rope.reference import rope_inv_freq, rope_reference
from ithaca.kernels.swiglu import swiglu
from ithaca.kernels.swiglu.reference import swiglu_reference

OPS = ("attention", "rms_norm", "rope", "swiglu", "linear_cross_entropy", "linear_attention")
EPS, THETA = 1e-5, 10000.0
LINEAR_CHUNK = 64
"""Chunk length in the linear-attention FLOP count: our chunked and Triton paths' and fla's."""
COMPILE_MAX_CHUNKS = 16
"""Longest chunked linear attention (in chunks) handed to torch.compile; see the module docstring."""
GATE_SCALE = 1 / 16
"""Gated decays are logsigmoid(logit) / 16, as models/linear_attention.py makes them."""
FLA_GLA = "fla chunk_gla [head gate on every channel]"
MIN_SAMPLE_S = 0.01
"""Each timed sample repeats a call back to back until it lasts this long (bench/timing.py)."""
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    lengths: tuple[int, ...]
    doc_len: int


SIZES = {
    "cuda": Sizes(heads=16, kv_heads=4, head_dim=128, hidden=2048, ffn=5632, vocab=32768,
                  lengths=(4096, 16384, 65536, 131072), doc_len=2048),
    # toy sizes: the CPU run keeps the script alive, it measures nothing worth quoting
    "cpu": Sizes(heads=4, kv_heads=1, head_dim=32, hidden=256, ffn=704, vocab=2048, lengths=(256, 1024), doc_len=64),
}
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
"""Dense bf16 FLOP/s and HBM bytes/s of the SXM parts."""


@dataclass(frozen=True)
class Env:
    device: str
    dtype: torch.dtype
    sizes: Sizes
    compile: bool

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def ours(self) -> str:
        return "triton" if self.cuda else "auto"


@dataclass
class Impl:
    """One way to compute the op: `fn` runs its forward and returns the output(s) that take cotangents."""

    name: str
    fn: Callable[[], Any] | None = None
    skip: str | None = None
    on_error: str = "failed"


@dataclass
class Job:
    op: str
    shape: str
    passes: str
    work: float
    unit: Literal["flop", "byte"]
    """What `work` counts, and so which of the device's peaks it is held against."""
    candidates: list[Candidate]


def _brief(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:100]}"


def _peer(name: str, module: str, attr: str, call: Callable[[Callable[..., Any]], Any], env: Env) -> Impl:
    """The candidate call(module.attr), or a skip saying why the peer cannot run here."""
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as error:  # ImportError, or a peer that breaks on import against this torch
        return Impl(name, skip=f"{module} not importable ({_brief(error)})")
    if not env.cuda:
        return Impl(name, skip=f"{module} runs on CUDA only")
    return Impl(name, lambda: call(fn))


def _compiled(name: str, fn: Callable[..., Any], call: Callable[[Callable[..., Any]], Any], env: Env) -> Impl:
    """The candidate call(torch.compile(fn)); compilation happens in its warm-up call."""
    if not env.compile:
        return Impl(name, skip="--no-compile")
    compiled = torch.compile(fn, dynamic=False)
    return Impl(name, lambda: call(compiled), on_error="failed" if env.cuda else "skipped: compile failed on the CPU")


def _jobs(op: str, shape: str, impls: list[Impl], inputs: tuple[torch.Tensor, ...],
          cotangents: tuple[torch.Tensor, ...] | None, fwd_work: float, total_work: float, unit: str,
          forward_alone: bool) -> list[Job]:
    """The fwd+bwd job (and the fwd-only one) over one set of inputs: every Impl as a Candidate.

    Backward is torch.autograd.grad of the outputs with respect to `inputs` (no .grad
    accumulation between calls); `cotangents` None means the output is a scalar loss.
    """

    def forward(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run

    def forward_backward(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            outs = fn()
            torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), inputs, cotangents)
        return run

    def candidates(make: Callable[[Callable[[], Any]], Callable[[], None]]) -> list[Candidate]:
        return [Candidate(i.name, skip=i.skip) if i.fn is None else Candidate(i.name, make(i.fn), on_error=i.on_error)
                for i in impls]

    jobs = [Job(op, shape, "fwd+bwd", total_work, unit, candidates(forward_backward))]
    if forward_alone:
        jobs.insert(0, Job(op, shape, "fwd", fwd_work, unit, candidates(forward)))
    return jobs


def _randn(*shape: int, env: Env, gen: torch.Generator, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
    t = (torch.randn(*shape, generator=gen) * scale).to(env.device, env.dtype)
    return t.requires_grad_(grad)


# ---- softmax attention -------------------------------------------------------------------------

def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over [b, s, h, d] (torch wants [b, h, s, d]); GQA by enable_gqa, no copy of k, v."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _document_block_mask(doc_ids: torch.Tensor, env: Env) -> Any:
    """flex_attention's mask for causal attention inside each document; built once, outside the timing,
    as a model builds it once per batch for all its layers."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = doc_ids[0]

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    s = docs.shape[0]
    # _compile=True builds it block by block; eagerly it would hold an [s, s] mask (16 GiB at 128K)
    return create_block_mask(same_document_causal, 1, None, s, s, device=env.device, _compile=env.cuda)


def attention_jobs(s: int, env: Env, with_docs: bool) -> list[Job]:
    """Causal GQA attention, over the whole sequence or inside packed documents of doc_len tokens."""
    z = env.sizes
    gen = torch.Generator().manual_seed(0)
    q = _randn(1, s, z.heads, z.head_dim, env=env, gen=gen)
    k, v = (_randn(1, s, z.kv_heads, z.head_dim, env=env, gen=gen) for _ in range(2))
    dout = _randn(1, s, z.heads, z.head_dim, env=env, gen=gen, grad=False)
    doc = min(z.doc_len, s)
    doc_ids = (torch.arange(s, device=env.device) // doc)[None] if with_docs else None
    impls = [Impl(f"ours [{env.ours}]", lambda: attention(q, k, v, doc_ids=doc_ids, impl=env.ours))]
    if with_docs:
        # flash-attn's varlen kernel takes one sequence per document: their offsets are made once per
        # batch, outside the timing; q, k, v as [tokens, heads, d]
        cu_seqlens = torch.tensor([*range(0, s, doc), s], dtype=torch.int32, device=env.device)
        impls.append(Impl("eager [ours, impl=tiled]", lambda: attention(q, k, v, doc_ids=doc_ids, impl="tiled")))
        try:
            mask = _document_block_mask(doc_ids, env) if env.compile else None
            impls.append(_compiled("torch.compile [flex_attention]", _flex, lambda flex: flex(q, k, v, mask), env))
        except Exception as error:
            impls.append(Impl("torch.compile [flex_attention]", skip=f"create_block_mask failed: {_brief(error)}"))
        impls.append(_peer("flash-attn 2 [varlen]", "flash_attn", "flash_attn_varlen_func", lambda varlen: varlen(
            q[0], k[0], v[0], cu_seqlens, cu_seqlens, doc, doc, causal=True)[None], env))
    else:
        impls += [Impl("eager [F.sdpa]", lambda: _sdpa(q, k, v)),
                  _compiled("torch.compile [F.sdpa]", _sdpa, lambda sdpa: sdpa(q, k, v), env),
                  _peer("flash-attn 2", "flash_attn", "flash_attn_func",  # [b, s, h, d] and GQA, as ours
                        lambda flash: flash(q, k, v, causal=True), env)]
    fwd = 4 * z.heads * z.head_dim * s * (doc if with_docs else s) / 2
    op = f"attention, docs of {doc}" if with_docs else "attention"
    shape = f"s={s} h={z.heads}/{z.kv_heads} d={z.head_dim}"
    return _jobs(op, shape, impls, (q, k, v), (dout,), fwd, 3.5 * fwd, "flop", forward_alone=True)


# ---- norms, rope, swiglu (memory-bound) --------------------------------------------------------

LIGER = "liger_kernel.transformers.functional"


def rms_norm_jobs(s: int, env: Env, with_residual: bool) -> list[Job]:
    """RMSNorm of [s, hidden], or the pre-norm block's fused add: (norm(x + r), x + r)."""
    z = env.sizes
    gen = torch.Generator().manual_seed(0)
    x, weight = _randn(s, z.hidden, env=env, gen=gen), _randn(z.hidden, env=env, gen=gen)
    residual = _randn(s, z.hidden, env=env, gen=gen) if with_residual else None
    dy, ds = (_randn(s, z.hidden, env=env, gen=gen, grad=False) for _ in range(2))
    impls = [Impl(f"ours [{env.ours}]", lambda: rms_norm(x, weight, EPS, residual=residual, impl=env.ours)),
             Impl("eager [reference]", lambda: rms_norm_reference(x, weight, EPS, residual)),
             _compiled("torch.compile [reference]", rms_norm_reference, lambda f: f(x, weight, EPS, residual), env)]
    # "gemma" casting with offset 0: x * rstd * weight all in fp32, as ours; in_place=False because
    # liger's default writes dx over the incoming gradient, which ours never does
    if with_residual:
        impls.append(_peer("liger fused_add_rms_norm", LIGER, "liger_fused_add_rms_norm", lambda f: f(
            x, residual, weight, EPS, offset=0.0, casting_mode="gemma", in_place=False), env))
        return _jobs("rms_norm+residual", f"[{s}, {z.hidden}]", impls, (x, residual, weight), (dy, ds), 0,
                     8 * s * z.hidden * x.element_size(), "byte", forward_alone=False)
    impls.append(_peer("liger rms_norm", LIGER, "liger_rms_norm", lambda f: f(
        x, weight, EPS, offset=0.0, casting_mode="gemma", in_place=False), env))
    return _jobs("rms_norm", f"[{s}, {z.hidden}]", impls, (x, weight), (dy,), 0, 5 * s * z.hidden * x.element_size(),
                 "byte", forward_alone=False)


def rope_jobs(s: int, env: Env) -> list[Job]:
    """Rotary embedding of q [1, s, h, d] and k [1, s, h_kv, d] at positions restarting per document."""
    z = env.sizes
    gen = torch.Generator().manual_seed(0)
    q, dq = (_randn(1, s, z.heads, z.head_dim, env=env, gen=gen, grad=g) for g in (True, False))
    k, dk = (_randn(1, s, z.kv_heads, z.head_dim, env=env, gen=gen, grad=g) for g in (True, False))
    positions = (torch.arange(s, device=env.device) % min(z.doc_len, s))[None]
    # liger takes Hugging Face's fp32 cos/sin [1, s, d] (both halves) that a model makes once per
    # batch for all layers, so outside the timing; q, k go in as [b, h, s, d] views of ours. It
    # rotates q and k (and dq, dk in backward) in place: rotations keep the inputs' scale.
    angles = positions.float()[..., None] * rope_inv_freq(z.head_dim, THETA, q.device)  # [1, s, d/2]
    cos, sin = (torch.cat((f, f), dim=-1) for f in (angles.cos(), angles.sin()))  # [1, s, d]

    def liger(liger_rope: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
        q_rot, k_rot = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

    impls = [Impl(f"ours [{env.ours}]", lambda: rope(q, k, positions, THETA, impl=env.ours)),
             Impl("eager [reference]", lambda: rope_reference(q, k, positions, THETA)),
             _compiled("torch.compile [reference]", rope_reference, lambda f: f(q, k, positions, THETA), env),
             _peer("liger rope", LIGER, "liger_rope", liger, env)]
    work = 4 * s * (z.heads + z.kv_heads) * z.head_dim * q.element_size()
    return _jobs("rope", f"s={s} h={z.heads}/{z.kv_heads} d={z.head_dim}", impls, (q, k), (dq, dk), 0, work, "byte",
                 forward_alone=False)


def swiglu_jobs(s: int, env: Env) -> list[Job]:
    """silu(gate) * up over [s, ffn]."""
    z = env.sizes
    gen = torch.Generator().manual_seed(0)
    gate, up = (_randn(s, z.ffn, env=env, gen=gen) for _ in range(2))
    dy = _randn(s, z.ffn, env=env, gen=gen, grad=False)
    impls = [Impl(f"ours [{env.ours}]", lambda: swiglu(gate, up, impl=env.ours)),
             Impl("eager [reference]", lambda: swiglu_reference(gate, up)),
             _compiled("torch.compile [reference]", swiglu_reference, lambda f: f(gate, up), env),
             # silu in fp32 like ours; liger multiplies by `up` in bf16 where ours multiplies in fp32
             _peer("liger swiglu", LIGER, "liger_swiglu", lambda f: f(gate, up), env)]
    return _jobs("swiglu", f"[{s}, {z.ffn}]", impls, (gate, up), (dy,), 0, 8 * s * z.ffn * gate.element_size(),
                 "byte", forward_alone=False)


# ---- linear cross-entropy ----------------------------------------------------------------------

def _naive_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), labels)  # [n, V] logits held whole


def linear_cross_entropy_jobs(n: int, env: Env) -> list[Job]:
    """Every candidate computes the training loss, the mean over tokens, and its gradients with
    respect to hidden and weight (labels all valid, so every reduction agrees)."""
    z = env.sizes
    gen = torch.Generator().manual_seed(0)
    hidden = _randn(n, z.hidden, env=env, gen=gen)
    weight = _randn(z.vocab, z.hidden, env=env, gen=gen, scale=z.hidden ** -0.5)
    labels = torch.randint(0, z.vocab, (n,), generator=gen).to(env.device)
    naive = "F.cross_entropy(h @ W.T)"
    impls = [Impl(f"ours [{env.ours}]", lambda: linear_cross_entropy(hidden, weight, labels, impl=env.ours).mean()),
             Impl(f"eager [{naive}]", lambda: _naive_cross_entropy(hidden, weight, labels)),
             _compiled(f"torch.compile [{naive}]", _naive_cross_entropy, lambda f: f(hidden, weight, labels), env),
             # accum_dtype fp32: ours accumulates dweight in fp32 (liger's default, in bf16). Liger
             # computes the gradients inside its forward; its backward only scales them.
             _peer("liger fused_linear_cross_entropy", LIGER, "liger_fused_linear_cross_entropy", lambda f: f(
                 hidden, weight, labels, reduction="mean", accum_dtype=torch.float32), env),
             # filter_eps=None: exact gradients like ours (its default skips blocks of small gradients)
             _peer("cut-cross-entropy", "cut_cross_entropy", "linear_cross_entropy", lambda f: f(
                 hidden, weight, labels, reduction="mean", filter_eps=None), env)]
    fwd = 2 * n * z.vocab * z.hidden
    return _jobs("linear_cross_entropy", f"n={n} V={z.vocab} d={z.hidden}", impls, (hidden, weight), None, fwd,
                 3 * fwd, "flop", forward_alone=False)


# ---- linear attention --------------------------------------------------------------------------

def _retention_log_decay(heads: int) -> torch.Tensor:
    """RetNet's per-head decays log(1 - 2^(-5 - head)), as models/linear_attention.py and fla's chunk_retention use."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32))))


def linear_attention_jobs(s: int, env: Env, gated: bool) -> list[Job]:
    """Retention ([h] fixed decays, no gradient) or gated ([b, s, h] per-token decays, with gradient).

    fla is called in the same [B, T, H, K] layout with log-space decays, our scale and a final
    state returned, as ours returns one; q, k, v in the run's dtype, decays fp32.
    """
    z = env.sizes
    h, d = z.heads, z.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(1, s, h, d, env=env, gen=gen) for _ in range(3))
    dout = _randn(1, s, h, d, env=env, gen=gen, grad=False)
    scale = d ** -0.5
    if gated:
        log_decay = (F.logsigmoid(torch.randn(1, s, h, generator=gen)) * GATE_SCALE).to(env.device).requires_grad_()
    else:
        log_decay = _retention_log_decay(h).to(env.device)
    impls = [Impl(f"ours [{env.ours}]", lambda: linear_attention(q, k, v, log_decay, scale=scale, impl=env.ours)[0]),
             Impl("eager [ours, impl=chunked]",
                  lambda: linear_attention(q, k, v, log_decay, scale=scale, impl="chunked")[0])]
    chunks = -(-s // LINEAR_CHUNK)
    if chunks > COMPILE_MAX_CHUNKS:
        impls.append(Impl("torch.compile [chunked]", skip=f"not attempted: dynamo unrolls the chunked form's loop, "
                          f"{chunks} chunk bodies in one graph (tried up to {COMPILE_MAX_CHUNKS})"))
    else:
        impls.append(_compiled("torch.compile [chunked]", linear_attention_chunked, lambda f: f(
            q, k, v, log_decay, scale=scale, chunk_size=LINEAR_CHUNK)[0], env))
    if gated:
        impls += [_peer("fla chunk_simple_gla", "fla.ops.simple_gla", "chunk_simple_gla", lambda f: f(
                      q, k, v, g=log_decay, scale=scale, output_final_state=True)[0], env),
                  # GLA gates each key channel: the head's gate on all d channels is our math on its kernel
                  _peer(FLA_GLA, "fla.ops.gla", "chunk_gla", lambda f: f(
                      q, k, v, log_decay[..., None].expand(1, s, h, d), scale=scale, output_final_state=True)[0], env)]
    else:
        impls += [_peer("fla chunk_simple_gla", "fla.ops.simple_gla", "chunk_simple_gla", lambda f: f(
                      q, k, v, g_gamma=log_decay, scale=scale, output_final_state=True)[0], env),
                  _peer("fla chunk_retention", "fla.ops.retention", "chunk_retention", lambda f: f(  # its own decays:
                      q, k, v, scale=scale, output_final_state=True)[0], env)]  # the same values as ours
    fwd = s * h * (2 * LINEAR_CHUNK * (d + d) + 4 * d * d)
    op = "linear_attention, gated" if gated else "linear_attention, retention"
    inputs = (q, k, v, log_decay) if gated else (q, k, v)
    return _jobs(op, f"s={s} h={h} d={d}", impls, inputs, (dout,), fwd, 3 * fwd, "flop", forward_alone=True)


def jobs_for(op: str, s: int, env: Env) -> list[Job]:
    if op == "attention":
        return attention_jobs(s, env, with_docs=False) + attention_jobs(s, env, with_docs=True)
    if op == "rms_norm":
        return rms_norm_jobs(s, env, with_residual=False) + rms_norm_jobs(s, env, with_residual=True)
    if op == "rope":
        return rope_jobs(s, env)
    if op == "swiglu":
        return swiglu_jobs(s, env)
    if op == "linear_cross_entropy":
        return linear_cross_entropy_jobs(s, env)
    return linear_attention_jobs(s, env, gated=False) + linear_attention_jobs(s, env, gated=True)


# ---- table -------------------------------------------------------------------------------------

def _device_peaks(device: str) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of an H100/H200 SXM; None for any other device (PCIe and NVL parts differ)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    if "PCIe" in name or "NVL" in name:
        return None
    return next((peaks for key, peaks in PEAKS.items() if key in name), None)


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
    peaks = _device_peaks(args.device)
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
