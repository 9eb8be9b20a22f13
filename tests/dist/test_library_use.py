"""A library user builds and parallelizes a model with no launcher, config file or DeepSpeed engine."""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks


def _hybrid_losses(sp: int) -> tuple[torch.Tensor, bool]:
    """Per-token losses of a hybrid model over sp ranks (ring + LASP-2), gathered whole, and
    whether anything imported the launcher."""
    import sys

    import torch.distributed as dist

    from ithaca.data.batch import Batch
    from ithaca.models.llama_args import LlamaArgs
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama
    from ithaca.parallel.sequence_layout import SequenceLayout
    from ithaca.parallel.zigzag import zigzag_merge

    mesh = build_mesh(dp=1, pp=1, tp=1, device_type="cpu", sequence=SequenceLayout(sp=sp, sp_method="ring"))
    initialize_megatron(mesh)
    args = LlamaArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, layer_pattern="LS",
                     activation_checkpointing="selective")
    model = parallelize_llama(args, mesh, seed=3)
    window = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = model(Batch.from_window(window, eos_id=None).part(mesh.sequence, mesh.rank("sp")))
    losses.sum().backward()
    pieces = [torch.empty_like(losses) for _ in range(sp)]
    dist.all_gather(pieces, losses.detach(), group=mesh.group("sp"))
    whole = zigzag_merge(pieces, dim=1) if sp > 1 else pieces[0]
    return whole, "ithaca.launcher" in sys.modules


def test_parallelize_without_the_launcher_matches_one_process():
    ((single, launcher_single),) = run_ranks(_hybrid_losses, 1, 1)
    (parallel, launcher_parallel), _ = run_ranks(_hybrid_losses, 2, 2)
    assert not launcher_single and not launcher_parallel
    torch.testing.assert_close(parallel, single, rtol=1e-5, atol=1e-6)  # fp32: reduction order only


def test_the_mesh_owns_the_sequence_method_so_they_cannot_disagree():
    """Once `build_mesh(..., sp=2)` (ring degree 1 by default) then `parallelize_llama(..., sp_method="ring")`
    built a ring of one rank: each rank attended to its own piece only, silently. Now the method is
    part of the mesh's SequenceLayout, checked once, and neither call takes it apart."""
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama
    from ithaca.parallel.sequence_layout import LayoutError, SequenceLayout

    with pytest.raises(TypeError, match="sp_method"):
        parallelize_llama(None, None, sp_method="ring")
    with pytest.raises(TypeError, match="'sp'"):
        build_mesh(dp=1, pp=1, tp=1, sp=2, device_type="cpu")
    ring = SequenceLayout(sp=2, sp_method="ring")
    assert (ring.ring, ring.ulysses, ring.chunks) == (2, 1, 4)
    with pytest.raises(LayoutError, match="^ulysses_degree=3: usp needs ulysses_degree dividing sp=4"):
        SequenceLayout(sp=4, sp_method="usp", ulysses_degree=3)
    with pytest.raises(LayoutError, match="^sp_method='rings': use one of ulysses, ring, usp, allgather"):
        SequenceLayout(sp=2, sp_method="rings")
