"""With document masking, a model's loss on a packed window equals its documents run one by one.

Covers softmax layers (document masks, restarted positions) and linear layers (state dropped at
each document start), the latter with gated decay and an elu+1 feature map.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks

EOS = 256


def _packed_vs_separate(config: str, overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from ithaca.data.batch import Batch
    from ithaca.launcher.config.load import load_config
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama

    cfg = load_config(config, ["data.path=unused", "parallel.dp=1", "parallel.sp=1", *overrides])
    mesh = build_mesh(dp=1, pp=1, tp=1, device_type="cpu")
    initialize_megatron(mesh)
    model = parallelize_llama(cfg.model, mesh)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.randint(0, 256, (n,), generator=gen), torch.tensor([EOS])]) for n in (9, 1, 14)]
    window = torch.cat(docs)[None]  # [1, 27]: three documents, each ending in EOS
    packed = model(Batch.from_window(window, EOS))[0]
    separate = []
    for doc in docs:  # each document alone, positions from 0, no mask needed
        separate.append(model(Batch.from_window(doc[None], eos_id=None))[0])
    # the packed window's label at a document's last token (EOS) is the next document's first
    # token: there is no such label when run alone, so compare the per-document parts
    lengths = [len(d) - 1 for d in docs]
    pieces = list(packed.split([n + 1 for n in lengths[:-1]] + [lengths[-1]]))
    return torch.cat([p[:n] for p, n in zip(pieces, lengths)]), torch.cat(separate)


@pytest.mark.parametrize("config, overrides", [
    ("debug-cpu", []),
    ("debug-hybrid-cpu", ["model.linear_decay=gated", "model.linear_feature_map=elu1"]),
])
def test_packed_loss_equals_documents_one_by_one(config, overrides):
    ((packed, separate),) = run_ranks(_packed_vs_separate, 1, config, overrides)
    # fp32, same arithmetic on shorter rows: only summation order differs
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
