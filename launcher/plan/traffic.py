"""Bytes each rank sends per step, by collective, and whether they cross nodes.

Sequence parallelism, per layer, forward + backward, what each rank sends (bench/comm_counter.py
counts the same at torch.distributed; bench/sp_attention.py and bench/plan_check.py compare), for a
[b, n, h, d] layer split over P = sp ranks, s = n / P tokens each, a rank holding `pieces` pieces of
the sequence (2 under the ring's zigzag, else 1):

    Ulysses (U ranks)  2 passes x (2h + 2h_kv') b s d (U-1)/U elements, h_kv' = max(h_kv, U)
    ring (R ranks)     2 (R-1) blocks of K and V in the compute dtype, plus R fp32 gradient blocks,
                       a block being 2 b (s U) (h_kv'/U) d elements (U = 1 for ring alone); with
                       documents, each of the 2 (R-1) exchanges carries the block's b s U int64 ids
    usp                Ulysses over U ranks, then the ring over R = P / U groups
    allgather (K/V)    (P-1) 2 b s h_kv d elements gathered, the same reduce-scattered back,
                       and (P-1) b s int64 document ids
    LASP-2 allgather   2 (P-1) pieces b h (d d + 1) fp32: states and carries out, gradients back
    delta allgather    2 (P-1) pieces b h d 2d fp32: the (A, B) pairs out, their gradients back
    scan (L and D)     b h d d fp32 per link of the piece chain this rank sends over: forward
                       from a piece it holds to the next piece's rank, backward to the previous one
    delta halo         the D layers' convolution, over the same links: (K-1) b 3 h d elements and
                       (K-1) b fp32 reset flags forward, the elements' gradients backward

Other axes (ring-algorithm volumes, not counted by a benchmark): tp all-reduces two [b, s, dim]
activations forward and two backward per block (megatron-core's row/column pairs); dp x sp
reduces the gradients once per step (2 (P-1)/P of the local gradients: an all-reduce, or ZeRO-1/2's
reduce-scatter then all-gather of the weights; ZeRO-3 gathers the weights again for the backward,
3 (P-1)/P); pp sends two [b, s, dim] tensors per micro-batch forward over each stage boundary and
two back.

Activation checkpointing (full, or selective: the mixer's interior, where these exchanges happen)
runs each layer's forward again in the backward, so the forward's sends count twice.

Time: each rank sends a few states in the scan, but every rank waits for the whole chain, so the
step time charges the scan its chain (scan_chain), not the busiest rank's bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from ithaca.parallel.sequence_layout import piece_order
from ithaca.parallel.state_scan import SCAN_BLOCKS

FP32, INT64 = 4, 8


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """One mixing layer as one rank of its tp group sees it."""
    b: int
    n: int
    """Tokens of the whole sequence."""
    heads: int
    kv_heads: int
    head_dim: int
    elem: int
    """Bytes of one activation element (the compute dtype)."""


class Sends(NamedTuple):
    """Bytes one rank sends in a layer's forward and in its backward."""
    forward: int
    backward: int

    def total(self, recomputed: bool) -> int:
        """Forward + backward; a recomputed forward (activation checkpointing) sends its part again."""
        return self.forward * (2 if recomputed else 1) + self.backward


def ulysses_bytes(x: LayerShape, sp: int) -> Sends:
    s = x.n // sp
    kv = max(x.kv_heads, sp)
    one_pass = (2 * x.heads + 2 * kv) * x.b * s * x.head_dim * (sp - 1) // sp * x.elem
    return Sends(one_pass, one_pass)


def usp_inner_shape(x: LayerShape, ring: int) -> LayerShape:
    """What usp's Ulysses groups exchange: the sequence held by one ring rank's group."""
    return dataclasses.replace(x, n=x.n // ring)


def ring_part_bytes(x: LayerShape, sp: int, ring: int, document_mask: bool) -> Sends:
    """The ring's K/V blocks (ring alone: ring == sp; usp: after its Ulysses all-to-all)."""
    s, ulysses = x.n // sp, sp // ring
    block = 2 * x.b * s * ulysses * (max(x.kv_heads, ulysses) // ulysses) * x.head_dim
    ids = (ring - 1) * x.b * s * ulysses * INT64 if document_mask else 0
    blocks = (ring - 1) * block * x.elem + ids
    return Sends(blocks, blocks + ring * block * FP32)


def allgather_kv_bytes(x: LayerShape, sp: int, document_mask: bool) -> Sends:
    s = x.n // sp
    kv = (sp - 1) * 2 * x.b * s * x.kv_heads * x.head_dim * x.elem
    return Sends(kv + ((sp - 1) * x.b * s * INT64 if document_mask else 0), kv)


def state_allgather_bytes(x: LayerShape, sp: int, ring: int, kind: str) -> Sends:
    """LASP-2 (kind "L": states and carries) or delta-rule (kind "D": (A, B) pairs) all-gathers."""
    pieces = 2 if ring > 1 else 1
    per_piece = x.head_dim * x.head_dim + 1 if kind == "L" else x.head_dim * 2 * x.head_dim
    one_way = (sp - 1) * pieces * x.b * x.heads * per_piece * FP32
    return Sends(one_way, one_way)


def chain_links(sp: int, ring: int) -> list[tuple[int, int]]:
    """Per sp rank, (links of the piece chain it sends over forward, backward): piece i's state goes to
    piece i+1's rank when another rank holds it, its gradient back the other way."""
    owner = {}
    for rank in range(sp):
        mine, total = piece_order(sp_rank=rank, sp=sp, ring=ring)
        owner.update({piece: rank for piece in mine})
    links = [[0, 0] for _ in range(sp)]
    for piece in range(total - 1):
        here, there = owner[piece], owner[piece + 1]
        if here != there:
            links[here][0] += 1
            links[there][1] += 1
    return [(f, b) for f, b in links]


def scan_bytes(x: LayerShape, sp: int, ring: int) -> list[Sends]:
    """Per sp rank: the state scan's sends (L and D layers alike)."""
    state = x.b * x.heads * x.head_dim * x.head_dim * FP32
    return [Sends(forward * state, backward * state) for forward, backward in chain_links(sp, ring)]


def halo_bytes(x: LayerShape, sp: int, ring: int, conv_size: int) -> list[Sends]:
    """Per sp rank: a D layer's convolution halo over the chain's links."""
    tail = (conv_size - 1) * x.b * 3 * x.heads * x.head_dim * x.elem
    flags = (conv_size - 1) * x.b * FP32
    return [Sends(forward * (tail + flags), backward * tail) for forward, backward in chain_links(sp, ring)]


@dataclass(frozen=True)
class Collective:
    """One kind of traffic of a step: bytes the busiest rank sends, how many messages, which link."""
    bytes: int
    messages: int
    inter_node: bool
    overlapped_with: str | None = None
    """The compute it hides behind ("mixer": the layer's own attention), or None."""
    chain_bytes: int | None = None
    """Bytes the step waits for one after another along a chain of ranks (the scan): the time is
    theirs over the bandwidth, not `bytes`'."""

    @property
    def waited_bytes(self) -> int:
        return self.bytes if self.chain_bytes is None else self.chain_bytes


def layer_shape(cfg) -> LayerShape:
    """One mixing layer of `cfg` (a RunConfig) as one rank of its tp group sees it."""
    args, p, t = cfg.model, cfg.parallel, cfg.train
    return LayerShape(b=t.micro_batch, n=cfg.data.seq_len, heads=args.n_heads // p.tp,
                      kv_heads=args.kv_heads // p.tp, head_dim=args.head_dim, elem=2 if t.precision == "bf16" else 4)


def scan_chain(cfg) -> tuple[int, int]:
    """(messages, bytes) one layer's state scan waits for in sequence per pass (forward, backward, a
    recomputed forward): the chain visits the pieces in order, a hop wherever the next piece is on
    another rank, and a state crosses in SCAN_BLOCKS d_v blocks, block i+1 on the wire while block i
    is folded, so a pass waits for hops + blocks - 1 block messages."""
    x = layer_shape(cfg)
    hops = sum(forward for forward, _ in chain_links(cfg.parallel.sp, cfg.sequence.ring))
    messages = hops + SCAN_BLOCKS - 1
    return messages, messages * x.b * x.heads * x.head_dim * x.head_dim * FP32 // SCAN_BLOCKS


def sp_bytes_by_rank(cfg) -> dict[str, list[int]]:
    """Per sequence-parallel collective, what each sp rank sends in one micro-batch's forward +
    backward (`cfg` a RunConfig; the pipeline stage with the most layers)."""
    from ithaca.launcher.plan.memory import stage_parts

    args, p = cfg.model, cfg.parallel
    if p.sp == 1:
        return {}
    layers = max((part[0] for part in stage_parts(cfg)), key=len)
    kinds = [args.mixer(i) for i in layers]
    softmax, linear, delta = kinds.count("S"), kinds.count("L"), kinds.count("D")
    x = layer_shape(cfg)
    ulysses, ring, docs = cfg.sequence.ulysses, cfg.sequence.ring, cfg.data.document_mask
    again = args.activation_checkpointing != "none"  # both modes run the mixer's forward, exchanges included, again
    out: dict[str, list[int]] = {}
    if p.sp_method == "allgather":
        out["sp_kv_all_gather"] = [softmax * allgather_kv_bytes(x, p.sp, docs).total(again)] * p.sp
    if ulysses > 1:
        out["sp_ulysses_all_to_all"] = [softmax * ulysses_bytes(usp_inner_shape(x, ring), ulysses).total(again)] * p.sp
    if ring > 1:
        out["sp_ring_p2p"] = [softmax * ring_part_bytes(x, p.sp, ring, docs).total(again)] * p.sp
    if args.linear_sp_exchange == "scan":
        out["sp_state_scan"] = [(linear + delta) * sends.total(again) for sends in scan_bytes(x, p.sp, ring)]
    else:
        out["sp_state_all_gather"] = [linear * state_allgather_bytes(x, p.sp, ring, "L").total(again)
                                      + delta * state_allgather_bytes(x, p.sp, ring, "D").total(again)] * p.sp
    out["sp_conv_halo"] = [delta * sends.total(again) for sends in halo_bytes(x, p.sp, ring, args.delta_conv_size)]
    return {name: sends for name, sends in out.items() if max(sends) > 0}


def _spans_nodes(span: int, gpus_per_node: int) -> bool:
    """Whether a group crosses a node: the mesh's axes run pp, dp, ring, ulysses, tp (tp innermost,
    consecutive ranks), so a group along an axis spans the axes inside it times its own size."""
    return span > gpus_per_node


SP_MESSAGES = {"sp_kv_all_gather": 3, "sp_ulysses_all_to_all": 8, "sp_ring_p2p": 3, "sp_state_all_gather": 2,
               "sp_conv_halo": 2}
"""Messages per layer and rank, for the latency term (all-gathers: per peer; the scan: scan_chain)."""


def step_traffic(cfg, gpus_per_node: int) -> dict[str, Collective]:
    """Per step, the busiest rank's traffic by collective (`cfg` a RunConfig)."""
    from ithaca.launcher.plan.memory import stage_parts

    args, p, t = cfg.model, cfg.parallel, cfg.train
    elem = 2 if t.precision == "bf16" else 4
    micro = cfg.grad_accum_steps
    out: dict[str, Collective] = {}
    sp_inter = _spans_nodes(p.tp * p.sp, gpus_per_node)
    layers = cfg.model.n_layers // p.pp + (1 if cfg.model.n_layers % p.pp else 0)
    for name, sends in sp_bytes_by_rank(cfg).items():
        inter = _spans_nodes(p.tp * cfg.sequence.ulysses, gpus_per_node) if name == "sp_ulysses_all_to_all" else sp_inter
        if name == "sp_state_scan":  # the chain's hops wait on one another: every pass of every L and D layer
            scanned = sum(args.mixer(i) in "LD" for i in max((part[0] for part in stage_parts(cfg)), key=len))
            passes = micro * scanned * (2 if args.activation_checkpointing == "none" else 3)
            messages, chain = scan_chain(cfg)
            out[name] = Collective(max(sends) * micro, messages * passes, inter, chain_bytes=chain * passes)
            continue
        peers = p.sp - 1 if name.endswith("all_gather") else 1
        out[name] = Collective(max(sends) * micro, SP_MESSAGES[name] * peers * layers * micro, inter,
                               "mixer" if name == "sp_ring_p2p" else None)
    tokens = t.micro_batch * cfg.data.seq_len // p.sp
    if p.tp > 1:  # 2 all-reduces forward and 2 backward per block, ring volume 2 (P-1)/P each
        out["tp_all_reduce"] = Collective(layers * micro * 4 * 2 * (p.tp - 1) * tokens * args.dim * elem // p.tp,
                                          layers * micro * 4 * 2 * (p.tp - 1), _spans_nodes(p.tp, gpus_per_node))
    if p.dp * p.sp > 1:
        from ithaca.launcher.plan.memory import stage_memory

        group = p.dp * p.sp
        params = max(stage_memory(cfg, s).weights for s in range(p.pp)) * (group if t.zero_stage == 3 else 1)
        passes = 3 if t.zero_stage == 3 else 2
        out["dp_gradient_reduce"] = Collective(passes * (group - 1) * params // group, passes * (group - 1),
                                               _spans_nodes(p.tp * p.sp * p.dp, gpus_per_node))
    if p.pp > 1:  # x and the residual stream forward, their gradients backward
        out["pp_p2p"] = Collective(micro * 2 * 2 * tokens * args.dim * elem, micro * 4,
                                   _spans_nodes(p.world_size, gpus_per_node))
    return out
