"""Ring attention (arXiv:2310.01889) with zigzag balancing; math in DESIGN.md, "Ring attention".

Each rank keeps its queries and passes key/value blocks around the ring for P steps; every step
yields a partial output and log-sum-exp that are merged stably. Inputs are in zigzag order (rank r
holds chunks r and 2P-1-r of 2P), which makes the causal mask reduce to three block shapes:

    step 0 (own keys)          both query chunks x both key chunks, causal
    keys from rank j < r       both query chunks x the keys' first chunk, full
    keys from rank j > r       the queries' second chunk x both key chunks, full

so every rank does the same work each step and no block is entirely masked. With packed documents
(`doc_ids`), each block also masks query/key pairs from different documents: the ids travel with
their key/value block and the block kernel (kernels/attention) reads them per tile, so no block
ever builds a dense mask or dense scores. Backward passes the
key/value blocks around again, with dK/dV accumulators that travel with the block they belong to
and arrive home after P hops. Only this rank's q, k, v, output and log-sum-exp are saved; no rank
ever holds the whole sequence's keys.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ithaca.kernels.attention import LseImpl, attention_lse_bwd, attention_lse_fwd, check_attention_inputs

_ALL = slice(None)


class RingComm:
    """Posts sends and receives together (`batch_isend_irecv`) so the caller can compute while they fly.

    Usage: `incoming = comm.exchange(tensors)`; compute; `comm.wait()`; only then read `incoming`.
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self._pending: list[dist.Work] = []
        self._sending: list[torch.Tensor] = []  # kept alive until the sends complete

    def exchange(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Start sending `tensors` to the next rank; return buffers that receive the previous rank's."""
        assert not self._pending, "wait() for the last exchange first"
        incoming = [torch.empty_like(t) for t in tensors]
        self._sending = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in self._sending]
        ops += [dist.P2POp(dist.irecv, buf, self.prev, self.group) for buf in incoming]
        self._pending = dist.batch_isend_irecv(ops)
        return incoming

    def wait(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending, self._sending = [], []


def _block(step: int, rank: int, world: int, is_causal: bool, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal?) that step `step` computes; see the module docstring."""
    if not is_causal:
        return _ALL, _ALL, False
    if step == 0:
        return _ALL, _ALL, True
    source = (rank - step) % world
    if source < rank:
        return _ALL, slice(0, half), False
    return slice(half, None), _ALL, False


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a block's (out_b, lse_b) into the running fp32 (out, lse) at `rows`, in place.

    DESIGN.md: l = log(e^la + e^lb) (logaddexp stays finite for large l); o = e^(la-l) o_a + e^(lb-l) o_b.
    """
    lse_a = lse[:, :, rows]
    merged = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - merged).transpose(1, 2)[..., None]  # [b, h, s] -> [b, s, h, 1]
    weight_b = torch.exp(lse_b - merged).transpose(1, 2)[..., None]
    out[:, rows] = weight_a * out[:, rows] + weight_b * out_b.float()
    lse[:, :, rows] = merged


def _block_docs(doc_ids: torch.Tensor | None, kv: list[torch.Tensor], rows: slice, cols: slice) -> dict:
    """The document ids of a block's queries and keys, as the block kernel takes them (none: no documents)."""
    if doc_ids is None:
        return {}
    return {"q_doc_ids": doc_ids[:, rows], "k_doc_ids": kv[-1][:, cols]}


class _RingAttention(torch.autograd.Function):
    """forward:  P-1 ring exchanges of (k, v[, doc_ids]), each overlapped with one block's attention.
    backward: P-1 ring exchanges of (k, v[, doc_ids]) and P of the (dk, dv) accumulators.
    Each exchange sends this rank's k and v (2 * b * s * h_kv * d elements) to the next rank.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None,
                group: dist.ProcessGroup, is_causal: bool, scale: float, impl: str) -> torch.Tensor:
        comm = RingComm(group)
        half = q.shape[1] // 2
        out = lse = None
        kv = [k, v] if doc_ids is None else [k, v, doc_ids]
        for step in range(comm.world):
            last = step == comm.world - 1
            incoming = None if last else comm.exchange(kv)  # next block flies while this one computes
            rows, cols, causal = _block(step, comm.rank, comm.world, is_causal, half)
            out_b, lse_b = attention_lse_fwd(q[:, rows], kv[0][:, cols], kv[1][:, cols], is_causal=causal,
                                             scale=scale, impl=impl, **_block_docs(doc_ids, kv, rows, cols))
            if out is None:  # step 0 always covers every query row
                out, lse = out_b.float(), lse_b
            else:
                _merge(out, lse, rows, out_b, lse_b)
            if not last:
                comm.wait()  # guards `incoming`
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.group, ctx.is_causal, ctx.scale, ctx.impl = group, is_causal, scale, impl
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        kv_comm, grad_comm = RingComm(ctx.group), RingComm(ctx.group)
        world, rank, half = kv_comm.world, kv_comm.rank, q.shape[1] // 2
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = [k, v] if doc_ids is None else [k, v, doc_ids]
        dkv = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        incoming_dkv = None
        for step in range(world):
            last = step == world - 1
            incoming_kv = None if last else kv_comm.exchange(kv)
            rows, cols, causal = _block(step, rank, world, ctx.is_causal, half)
            dq_b, dk_b, dv_b = attention_lse_bwd(dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                                                 out[:, rows], lse[:, :, rows], is_causal=causal, scale=ctx.scale,
                                                 impl=ctx.impl, **_block_docs(doc_ids, kv, rows, cols))
            dq[:, rows] += dq_b
            if incoming_dkv is not None:
                grad_comm.wait()  # guards incoming_dkv: the accumulator of the block we now hold
                dkv = incoming_dkv
            dkv[0][:, cols] += dk_b
            dkv[1][:, cols] += dv_b
            if world > 1:  # the accumulator follows its block; after P hops it is home
                incoming_dkv = grad_comm.exchange(dkv)
            if not last:
                kv_comm.wait()  # guards incoming_kv
                kv = incoming_kv
        if incoming_dkv is not None:
            grad_comm.wait()
            dkv = incoming_dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                   causal: bool = True, scale: float | None = None,
                   doc_ids: torch.Tensor | None = None, impl: LseImpl = "auto") -> torch.Tensor:
    """Exact softmax attention over a sequence split across `group`, keys and values passed around a ring.

    q [b, s, h, d], k and v [b, s, h_kv, d] (h a multiple of h_kv; only kv heads travel): this
    rank's part of the sequence in zigzag order (`zigzag_split`). Returns this rank's [b, s, h, d]
    part of the output, in the same order. `scale` defaults to d^-0.5. `doc_ids` [b, s] (int, this
    rank's part, same layout) marks packed documents: no query reads another document's keys.
    `impl` picks the block kernel (kernels/attention: "auto", "triton", "flash", "tiled", ...).
    Communication per call, per rank: forward sends (P-1) * 2*b*s*h_kv*d elements, backward about
    twice that (blocks and their gradient accumulators).
    Raises ValueError on inconsistent shapes, or (causal) a local length that is not even.
    """
    check_attention_inputs("ring_attention", q, k, v, doc_ids=doc_ids, same_length=True)
    if causal and q.shape[1] % 2:
        raise ValueError(f"ring_attention: causal zigzag needs an even local length (two chunks); got {q.shape[1]}; "
                         "split a sequence divisible by 2*P with zigzag_split")
    _check_same_shapes(k, group)
    return _RingAttention.apply(q, k, v, doc_ids, group, causal, q.shape[-1] ** -0.5 if scale is None else scale,
                                impl)


_checked: set[tuple] = set()


def _check_same_shapes(k: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Every rank must pass blocks of one shape; checked once per (group, shape) with one tiny all-gather."""
    key = (group.group_name if hasattr(group, "group_name") else id(group), tuple(k.shape))
    if key in _checked:
        return
    mine = torch.tensor(k.shape, dtype=torch.int64, device=k.device)  # nccl gathers device tensors
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, mine, group=group)
    if any(not torch.equal(s, mine) for s in shapes):
        raise ValueError(f"ring_attention: ranks pass different k/v shapes {[tuple(s.tolist()) for s in shapes]}; "
                         "every rank needs the same batch, local length, heads and head dim")
    _checked.add(key)
