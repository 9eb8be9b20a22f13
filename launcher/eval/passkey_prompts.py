"""Passkey prompts: filler text from the eval shards with a random key of digits hidden at a depth,
then the question and the key again as the answer, each prompt one window scored teacher-forced.

A prompt of length L is L tokens: filler, the needle sentence (" The pass key is 12345. ") placed
after `depth` of the filler, more filler, the question (" What is the pass key? The pass key is ")
and the key as the tokenizer encodes it. Its window is the prompt then EOS up to seq_len + 1
tokens; only the labels that predict the answer's tokens are kept (attention is causal, so what
follows the prompt changes nothing). Keys and filler offsets come from a fixed seed, so the
prompts are the same for every layout, every eval and every run on the same eval data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ithaca.data.shard_reader import read_shard
from ithaca.data.shards import Manifest, read_manifest
from ithaca.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from ithaca.launcher.config.schema import ConfigError, RunConfig

DEPTHS = (0, 25, 50, 75, 100)
"""Where the needle sits, in percent of the filler before it."""
KEY_DIGITS = 5
SEED = 20240
NEEDLE = " The pass key is {key}. "
QUESTION = " What is the pass key? The pass key is "
MIN_FILLER = 32
"""Filler tokens the shortest prompt holds at least: below that, depth means little."""


@dataclass(frozen=True)
class PasskeyPrompts:
    """Every prompt as one window, cell by cell (lengths, then depths, then samples)."""

    windows: torch.Tensor
    """[n, seq_len + 1] int64: the prompt, then EOS."""
    answer: torch.Tensor
    """[n, seq_len] bool: True where the label is one of the key's answer tokens."""
    cells: list[tuple[int, int]]
    """(length, depth) of each prompt."""
    lengths: list[int]
    eos_id: int


def passkey_tokenizer(cfg: RunConfig, manifest: Manifest) -> Tokenizer:
    """The tokenizer the eval shards were prepped with: the byte one, or data.tokenizer's tokenizer.json.
    Raises ConfigError when the shards name a tokenizer.json and data.tokenizer is not set."""
    if manifest.tokenizer["kind"] == "byte":
        return ByteTokenizer()
    if cfg.data.tokenizer is None:
        raise ConfigError("eval.metrics", "passkey", "the eval shards were prepped with a tokenizer.json; set "
                          "data.tokenizer to its path so that the prompts are tokenized as the shards were")
    return load_tokenizer(cfg.data.tokenizer)


def passkey_lengths(fixed_tokens: int, seq_len: int) -> list[int]:
    """Powers of two up to seq_len, from the first that leaves MIN_FILLER tokens of filler beside the
    fixed part (needle, question, answer). Raises ConfigError when none fits."""
    shortest = 1 << (fixed_tokens + MIN_FILLER - 1).bit_length()
    length = shortest
    lengths = []
    while length <= seq_len:
        lengths.append(length)
        length *= 2
    if not lengths:
        raise ConfigError("eval.metrics", "passkey", f"eval.seq_len={seq_len} is shorter than the shortest passkey "
                          f"prompt ({shortest} tokens); raise eval.seq_len")
    return lengths


def filler_tokens(folder: Path | str, manifest: Manifest, count: int) -> np.ndarray:
    """The first `count` tokens of the folder's documents joined without EOS (fewer if it holds fewer)."""
    pieces, have = [], 0
    for info in manifest.shards:
        for doc in read_shard(folder, info):
            pieces.append(doc.astype(np.int64))
            have += doc.size
            if have >= count:
                return np.concatenate(pieces)[:count]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def build_prompts(tokenizer: Tokenizer, filler: np.ndarray, *, seq_len: int, samples: int) -> PasskeyPrompts:
    """`samples` prompts for each (length, depth) cell. Raises ValueError when the filler is shorter
    than the longest prompt needs."""
    rng = np.random.default_rng(SEED)
    question = tokenizer.encode(QUESTION)
    fixed = len(tokenizer.encode(NEEDLE.format(key="0" * KEY_DIGITS))) + len(question) + 2 * KEY_DIGITS
    lengths = passkey_lengths(fixed, seq_len)
    if filler.size < lengths[-1]:
        raise ValueError(f"eval data holds {filler.size} tokens, fewer than the {lengths[-1]}-token passkey "
                         "prompt needs as filler; use a bigger eval set or a shorter eval.seq_len")
    windows, answers, cells = [], [], []
    for length in lengths:
        for depth in DEPTHS:
            for _ in range(samples):
                key = "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
                key_tokens = tokenizer.encode(key)
                needle = tokenizer.encode(NEEDLE.format(key=key))
                room = length - needle.size - question.size - key_tokens.size
                start = int(rng.integers(0, filler.size - room + 1))
                text = filler[start: start + room]
                cut = round(room * depth / 100)
                prompt = np.concatenate([text[:cut], needle, text[cut:], question, key_tokens])
                window = np.full(seq_len + 1, tokenizer.eos_id, dtype=np.int64)
                window[:length] = prompt
                answer = np.zeros(seq_len, dtype=bool)
                answer[length - key_tokens.size - 1: length - 1] = True  # label i is token i + 1
                windows.append(window)
                answers.append(answer)
                cells.append((length, depth))
    return PasskeyPrompts(windows=torch.from_numpy(np.stack(windows)), answer=torch.from_numpy(np.stack(answers)),
                          cells=cells, lengths=lengths, eos_id=tokenizer.eos_id)


def run_prompts(cfg: RunConfig, folder: Path | str) -> PasskeyPrompts:
    """The run's passkey prompts from the eval data in `folder` (the same on every rank). Raises
    ConfigError or ValueError naming the fix."""
    manifest = read_manifest(folder)
    seq_len = cfg.eval_seq_len
    return build_prompts(passkey_tokenizer(cfg, manifest), filler_tokens(folder, manifest, 4 * seq_len),
                         seq_len=seq_len, samples=cfg.eval.passkey_samples)
