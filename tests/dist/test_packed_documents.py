"""With document masking, the debug model's loss on a packed window equals its documents run one by one."""

from __future__ import annotations

import torch

from harness import run_ranks

EOS = 256


def _packed_vs_separate() -> tuple[torch.Tensor, torch.Tensor]:
    from ithaca.kernels.attention import attention
    from ithaca.launcher.config_load import load_config
    from ithaca.models.llama import Llama, token_losses
    from ithaca.parallel.megatron_bridge import initialize_megatron, model_parallel_config
    from ithaca.parallel.mesh import build_mesh
    from ithaca.data.packing import document_ids, document_positions
    from functools import partial

    cfg = load_config("debug-cpu", ["data.path=unused", "parallel.dp=1"])
    mesh = build_mesh(dp=1, pp=1, tp=1, sp=1, device_type="cpu")
    initialize_megatron(mesh)
    torch.manual_seed(0)
    model = Llama(cfg.model, model_parallel_config(mesh, torch.float32), partial(attention, is_causal=True))
    gen = torch.Generator().manual_seed(1)
    docs = [torch.cat([torch.randint(0, 256, (n,), generator=gen), torch.tensor([EOS])]) for n in (9, 1, 14)]
    window = torch.cat(docs)[None]  # [1, 27]: three documents, each ending in EOS
    tokens, labels = window[:, :-1], window[:, 1:]
    doc_ids = document_ids(tokens, EOS)
    packed = token_losses(model(tokens, document_positions(doc_ids), doc_ids), labels)[0]
    separate = []
    for doc in docs:  # each document alone, positions from 0, no mask needed
        t = doc[None]
        inputs, targets = t[:, :-1], t[:, 1:]
        separate.append(token_losses(model(inputs, torch.arange(inputs.shape[1])[None]), targets)[0])
    # the packed window's label at a document's last token (EOS) is the next document's first
    # token: there is no such label when run alone, so compare the per-document parts
    lengths = [len(d) - 1 for d in docs]
    pieces = list(packed.split([n + 1 for n in lengths[:-1]] + [lengths[-1]]))
    return torch.cat([p[:n] for p, n in zip(pieces, lengths)]), torch.cat(separate)


def test_packed_loss_equals_documents_one_by_one():
    ((packed, separate),) = run_ranks(_packed_vs_separate, 1)
    # fp32, same arithmetic on shorter rows: only summation order differs
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
