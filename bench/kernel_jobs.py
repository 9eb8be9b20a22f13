"""The candidates bench/kernels.py times for each op: ours, eager, torch.compile and the peers,
with their inputs and the work each call does (the module docstring of bench/kernels.py says
what each candidate is and how the work is counted)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from ithaca.bench.timing import Candidate
from ithaca.kernels.attention import attention
from ithaca.kernels.delta_rule import CHUNK as DELTA_CHUNK
from ithaca.kernels.delta_rule import delta_rule
from ithaca.kernels.linear_attention import linear_attention
from ithaca.kernels.linear_attention.chunked import linear_attention_chunked
from ithaca.kernels.linear_cross_entropy import linear_cross_entropy
from ithaca.kernels.rms_norm import rms_norm
from ithaca.kernels.rms_norm.reference import rms_norm_reference
from ithaca.kernels.rope import rope
from ithaca.kernels.rope.reference import rope_inv_freq, rope_reference
from ithaca.kernels.swiglu import swiglu
from ithaca.kernels.swiglu.reference import swiglu_reference
from ithaca.models.linear_attention import retention_log_decay

OPS = ("attention", "rms_norm", "rope", "swiglu", "linear_cross_entropy", "linear_attention", "delta_rule")
EPS, THETA = 1e-5, 10000.0
LINEAR_CHUNK = 64
"""Chunk length in the linear-attention FLOP count: our chunked and Triton paths' and fla's."""
COMPILE_MAX_CHUNKS = 16
"""Longest chunked linear attention (in chunks) handed to torch.compile; see the module docstring."""
DELTA_REFERENCE_MAX_TOKENS = 1024
"""Longest delta rule handed to its token recurrence (impl="reference"): one step per token, and its
backward keeps every step's [h, d_k, d_v] fp32 state (1 MiB a token at the CUDA sizes)."""
GATE_SCALE = 1 / 16
"""Gated decays are logsigmoid(logit) / 16, as models/linear_attention.py makes them."""
FLA_GLA = "fla chunk_gla [head gate on every channel]"


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


def _peer(name: str, module: str, attr: str, call: Callable[[Callable[..., Any]], Any], env: Env) -> Candidate:
    """The candidate call(module.attr), or a skip saying why the peer cannot run here."""
    try:
        fn = getattr(importlib.import_module(module), attr)
    except Exception as error:  # ImportError, or a peer that breaks on import against this torch
        return Candidate(name, skip=f"{module} not importable ({_brief(error)})")
    if not env.cuda:
        return Candidate(name, skip=f"{module} runs on CUDA only")
    return Candidate(name, lambda: call(fn))


def _compiled(name: str, fn: Callable[..., Any], call: Callable[[Callable[..., Any]], Any], env: Env) -> Candidate:
    """The candidate call(torch.compile(fn)); compilation happens in its warm-up call."""
    if not env.compile:
        return Candidate(name, skip="--no-compile")
    compiled = torch.compile(fn, dynamic=False)
    return Candidate(name, lambda: call(compiled), on_error="failed" if env.cuda else "skipped: compile failed on the CPU")


def _jobs(op: str, shape: str, impls: list[Candidate], inputs: tuple[torch.Tensor, ...],
          cotangents: tuple[torch.Tensor, ...] | None, fwd_work: float, total_work: float, unit: str,
          forward_alone: bool) -> list[Job]:
    """The fwd+bwd job (and the fwd-only one) over one set of inputs. Each of `impls` runs the op's
    forward and returns what takes cotangents; the jobs' candidates wrap that into a timed call.

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
        return [Candidate(i.name, skip=i.skip) if i.run is None else Candidate(i.name, make(i.run), on_error=i.on_error)
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
    impls = [Candidate(f"ours [{env.ours}]", lambda: attention(q, k, v, doc_ids=doc_ids, impl=env.ours))]
    if with_docs:
        # flash-attn's varlen kernel takes one sequence per document: their offsets are made once per
        # batch, outside the timing; q, k, v as [tokens, heads, d]
        cu_seqlens = torch.tensor([*range(0, s, doc), s], dtype=torch.int32, device=env.device)
        impls.append(Candidate("eager [ours, impl=tiled]", lambda: attention(q, k, v, doc_ids=doc_ids, impl="tiled")))
        try:
            mask = _document_block_mask(doc_ids, env) if env.compile else None
            impls.append(_compiled("torch.compile [flex_attention]", _flex, lambda flex: flex(q, k, v, mask), env))
        except Exception as error:
            impls.append(Candidate("torch.compile [flex_attention]", skip=f"create_block_mask failed: {_brief(error)}"))
        impls.append(_peer("flash-attn 2 [varlen]", "flash_attn", "flash_attn_varlen_func", lambda varlen: varlen(
            q[0], k[0], v[0], cu_seqlens, cu_seqlens, doc, doc, causal=True)[None], env))
    else:
        impls += [Candidate("eager [F.sdpa]", lambda: _sdpa(q, k, v)),
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
    impls = [Candidate(f"ours [{env.ours}]", lambda: rms_norm(x, weight, EPS, residual=residual, impl=env.ours)),
             Candidate("eager [reference]", lambda: rms_norm_reference(x, weight, EPS, residual)),
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
    freq = rope_inv_freq(z.head_dim, THETA, q.device)
    angles = positions.float()[..., None] * freq  # [1, s, d/2]
    cos, sin = (torch.cat((f, f), dim=-1) for f in (angles.cos(), angles.sin()))  # [1, s, d]

    def liger(liger_rope: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor]:
        q_rot, k_rot = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

    impls = [Candidate(f"ours [{env.ours}]", lambda: rope(q, k, positions, freq, impl=env.ours)),
             Candidate("eager [reference]", lambda: rope_reference(q, k, positions, freq)),
             _compiled("torch.compile [reference]", rope_reference, lambda f: f(q, k, positions, freq), env),
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
    impls = [Candidate(f"ours [{env.ours}]", lambda: swiglu(gate, up, impl=env.ours)),
             Candidate("eager [reference]", lambda: swiglu_reference(gate, up)),
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
    impls = [Candidate(f"ours [{env.ours}]", lambda: linear_cross_entropy(hidden, weight, labels, impl=env.ours).mean()),
             Candidate(f"eager [{naive}]", lambda: _naive_cross_entropy(hidden, weight, labels)),
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
        log_decay = retention_log_decay(h).to(env.device)
    impls = [Candidate(f"ours [{env.ours}]", lambda: linear_attention(q, k, v, log_decay, scale=scale, impl=env.ours)[0]),
             Candidate("eager [ours, impl=chunked]",
                  lambda: linear_attention(q, k, v, log_decay, scale=scale, impl="chunked")[0])]
    chunks = -(-s // LINEAR_CHUNK)
    if chunks > COMPILE_MAX_CHUNKS:
        impls.append(Candidate("torch.compile [chunked]", skip=f"not attempted: dynamo unrolls the chunked form's loop, "
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


# ---- delta rule --------------------------------------------------------------------------------

def delta_rule_jobs(s: int, env: Env) -> list[Job]:
    """Gated DeltaNet's inputs: L2-normalised keys, beta = sigmoid(x), per-token gates, all with gradient.

    fla's chunk_gated_delta_rule is called in the same [B, T, H, K] layout with log-space gates
    g (its recurrence decays the state before the delta, as ours), our scale and a final state
    returned; keys normalised here, not in its kernel (use_qk_l2norm_in_kernel off).
    """
    z = env.sizes
    h, d = z.heads, z.head_dim
    gen = torch.Generator().manual_seed(0)
    q, v = (_randn(1, s, h, d, env=env, gen=gen) for _ in range(2))
    k = F.normalize(torch.randn(1, s, h, d, generator=gen), dim=-1).to(env.device, env.dtype).requires_grad_()
    beta = torch.sigmoid(torch.randn(1, s, h, generator=gen)).to(env.device, env.dtype).requires_grad_()
    log_decay = (F.logsigmoid(torch.randn(1, s, h, generator=gen)) * GATE_SCALE).to(env.device).requires_grad_()
    dout = _randn(1, s, h, d, env=env, gen=gen, grad=False)
    scale = d ** -0.5

    def ours(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: delta_rule(q, k, v, beta, log_decay=log_decay, scale=scale, impl=impl)[0]

    impls = [Candidate(f"ours [{env.ours}]", ours(env.ours)),
             Candidate("eager [ours, impl=chunked]", ours("chunked"))]
    if s <= DELTA_REFERENCE_MAX_TOKENS:
        impls.append(Candidate("eager [ours, impl=reference]", ours("reference")))
    else:
        impls.append(Candidate("eager [ours, impl=reference]", skip=f"not attempted: the token recurrence takes s={s} "
                               f"sequential steps (tried up to {DELTA_REFERENCE_MAX_TOKENS})"))
    impls.append(_peer("fla chunk_gated_delta_rule", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                       lambda f: f(q, k, v, g=log_decay, beta=beta, scale=scale, output_final_state=True)[0], env))
    fwd = s * h * (2 * DELTA_CHUNK * (3 * d + 2 * d) + 6 * d * d)
    return _jobs("delta_rule, gated", f"s={s} h={h} d={d}", impls, (q, k, v, beta, log_decay), (dout,), fwd, 3 * fwd,
                 "flop", forward_alone=True)


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
    if op == "delta_rule":
        return delta_rule_jobs(s, env)
    return linear_attention_jobs(s, env, gated=False) + linear_attention_jobs(s, env, gated=True)
