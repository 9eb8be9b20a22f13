"""`model.init_from`: training starts from a Hugging Face Llama's weights under any layout.

The Llama is a tiny random `LlamaForCausalLM` saved with `save_pretrained`, with a tokenizer.json
beside it. Its weights are redrawn with a large std: at transformers' init (std 0.02) every logit is
near 0 and any weight mapping, right or wrong, gives a loss of about ln(vocab).
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from harness import run_ranks

transformers = pytest.importorskip("transformers")  # the test extra: only the parity checks need it

HF = dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=32)  # configs/extend-llama-cpu.yaml's
WINDOWS = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(0))  # [b, L + 1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-hf-llama")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)  # norms around 1; see the module docstring
    model.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _hf_token_losses(folder: Path, windows: torch.Tensor, config: object | None = None) -> torch.Tensor:
    """transformers' per-token cross-entropy [b, L] of `windows` [b, L + 1]."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")


def _our_token_losses(folder: str, tp: int, sp: int, sp_method: str, windows: torch.Tensor) -> torch.Tensor:
    """Per-token losses [b, L] of the model started from `folder` on tp x sp ranks, gathered whole."""
    import torch.distributed as dist

    from ithaca.data.batch import Batch
    from ithaca.models.hf_llama import llama_args_from_hf
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama
    from ithaca.parallel.sequence_layout import SequenceLayout
    from ithaca.parallel.zigzag import zigzag_merge

    mesh = build_mesh(dp=1, pp=1, tp=tp, device_type="cpu", sequence=SequenceLayout(sp=sp, sp_method=sp_method))
    initialize_megatron(mesh)
    config = json.loads((Path(folder) / "config.json").read_text())
    args = llama_args_from_hf(config, "config.json", init_from=folder)
    model = parallelize_llama(args, mesh, seed=7)  # the seed's weights are all replaced
    with torch.no_grad():  # positions 0..L-1: no document mask, as transformers' forward
        losses = model(Batch.from_window(windows, eos_id=None).part(mesh.sequence, sp_rank=mesh.rank("sp")))
    pieces = [torch.empty_like(losses) for _ in range(sp)]
    dist.all_gather(pieces, losses, group=mesh.group("sp"))
    return zigzag_merge(pieces, dim=1) if mesh.ring > 1 else torch.cat(pieces, dim=1)


@pytest.mark.parametrize("world, tp, sp, sp_method", [(1, 1, 1, "ulysses"), (2, 2, 1, "ulysses"), (2, 1, 2, "ring")])
def test_first_losses_equal_transformers(hf_folder, world, tp, sp, sp_method):
    got = run_ranks(_our_token_losses, world, str(hf_folder), tp, sp, sp_method, WINDOWS)
    want = _hf_token_losses(hf_folder, WINDOWS)
    for rank_losses in got:  # every rank gathered the whole sequence
        # fp32; tp splits the sums of the projections and the vocabulary's log-sum-exp: reordering only
        torch.testing.assert_close(rank_losses, want, rtol=1e-5, atol=1e-5)


def _pipeline_params(folder: str) -> dict[str, torch.Tensor]:
    """Each pp2 stage's parameters as it holds them (tp = 1, pipeline names)."""
    from ithaca.models.hf_llama import llama_args_from_hf
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama

    mesh = build_mesh(dp=1, pp=2, tp=1, device_type="cpu")
    initialize_megatron(mesh)
    args = llama_args_from_hf(json.loads((Path(folder) / "config.json").read_text()), "config.json", init_from=folder)
    return {n: p.detach().clone() for n, p in parallelize_llama(args, mesh).named_parameters()}


def test_pipeline_stages_take_their_own_layers(hf_folder):
    from safetensors.torch import load_file

    first, last = run_ranks(_pipeline_params, 2, str(hf_folder))
    hf = load_file(hf_folder / "model.safetensors")
    assert torch.equal(first["0.embed.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(first["1.block.attn.out.weight"], hf["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(last["2.block.ffn.down.weight"], hf["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(last["4.head.weight"], hf["lm_head.weight"])
    assert not any(n.startswith(("0.", "1.")) for n in last)


def _first_step_loss(config: str, overrides: list[str]) -> float:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    return run_training(load_config(config, overrides))[0].loss


def test_extend_config_continues_from_hf_weights_with_yarn(hf_folder, short_doc_shards, tmp_path):
    """configs/extend-llama-cpu.yaml (sp2 ring, YaRN x4) as shipped, pointed at the tiny Llama: its first
    step's loss is transformers' on the same batch, with the same YaRN scaling in transformers' config."""
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import build_loader
    from ithaca.models.hf_llama import hf_config

    overrides = [f"model.init_from={hf_folder}", f"data.path={short_doc_shards}", "data.document_mask=false",
                 f"train.output_dir={tmp_path / 'run'}", "train.steps=1"]
    (ours,) = {run for run in run_ranks(_first_step_loss, 2, "extend-llama-cpu", overrides)}
    cfg = load_config("extend-llama-cpu", overrides)
    one_rank = types.SimpleNamespace(dp=1, rank=lambda axis: 0)  # the loader needs only the dp axis
    loader = build_loader(cfg, one_rank, None)
    windows = torch.cat(loader.next_step())  # every micro-batch of the first step: [global_batch, L + 1]
    loader.close()
    scaled = transformers.LlamaConfig(**hf_config(cfg.model, max_position_embeddings=128, dtype=torch.float32,
                                                  eos_token_id=None))
    want = _hf_token_losses(hf_folder, windows, scaled).mean().item()
    assert ours == pytest.approx(want, rel=1e-5)  # fp32; the sp split reorders sums only
    assert not math.isclose(want, _hf_token_losses(hf_folder, windows).mean().item(), rel_tol=1e-3)  # YaRN counts


def _refusal(folder: str, overrides: dict) -> str:
    from ithaca.models.llama_args import LlamaArgs
    from ithaca.parallel.megatron_bridge import initialize_megatron
    from ithaca.parallel.mesh import build_mesh
    from ithaca.parallel.parallelize import parallelize_llama

    mesh = build_mesh(dp=1, pp=1, tp=1, device_type="cpu")
    initialize_megatron(mesh)
    numbers = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, norm_eps=1e-5)
    args = LlamaArgs(**{**numbers, **overrides}, init_from=folder)
    try:
        parallelize_llama(args, mesh)
    except ValueError as err:
        return str(err)
    raise AssertionError("a mismatched Hugging Face model was loaded")


def test_another_model_shape_is_refused_naming_file_and_field(hf_folder, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(hf_folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    ((shape,), (kv,), (missing,)) = (run_ranks(_refusal, 1, *case) for case in [
        (str(other), {}), (str(hf_folder), {"n_kv_heads": 4}), (str(tmp_path / "nothing"), {})])
    assert shape == (f"{other}/config.json: intermediate_size=128 but model.ffn_dim=192; set model.ffn_dim: 128 "
                     "to start from these weights")
    assert kv.startswith(f"{hf_folder}/config.json: num_key_value_heads=2 but model.n_kv_heads=4")
    assert "no config.json there" in missing


def test_the_folders_tokenizer_json_preps_shards(hf_folder, tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(20)))
    done = run_cli("prep", "--tokenizer", str(hf_folder / "tokenizer.json"), "--input", str(text), "--output",
                   str(tmp_path / "shards"), "--workers", "1")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_folder / "tokenizer.json"))
    assert manifest["tokenizer"]["kind"] == "tokenizer.json"
    assert manifest["tokenizer"]["eos_id"] == fast.convert_tokens_to_ids("</s>")
