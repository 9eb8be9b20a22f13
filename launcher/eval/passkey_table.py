"""The passkey table: per (prompt length, key depth) cell, the share of keys retrieved and the key
tokens' mean log-likelihood, from per-prompt sums (launcher/eval/passkey.py adds them up)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ithaca.launcher.eval.passkey_prompts import DEPTHS, PasskeyPrompts


@dataclass(frozen=True)
class PasskeyTable:
    """Per (length, depth) cell: the share of prompts retrieved and the key tokens' mean log-likelihood."""

    accuracy: dict[tuple[int, int], float]
    log_likelihood: dict[tuple[int, int], float]
    lengths: list[int]

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    def metrics(self) -> dict[str, float]:
        """passkey_acc_<length>_<depth> and passkey_ll_<length>_<depth> for every cell."""
        return {**{f"passkey_acc_{n}_{d}": v for (n, d), v in self.accuracy.items()},
                **{f"passkey_ll_{n}_{d}": v for (n, d), v in self.log_likelihood.items()}}

    def record(self) -> dict:
        """eval.json's passkey entry."""
        return {"lengths": self.lengths, "depths": list(DEPTHS),
                "cells": [{"length": n, "depth": d, "accuracy": self.accuracy[(n, d)],
                           "log_likelihood": self.log_likelihood[(n, d)]} for n, d in self.accuracy]}


def passkey_table(prompts: PasskeyPrompts, sums: torch.Tensor) -> PasskeyTable:
    """The table from per-prompt sums [3, n]: answer tokens, tokens whose argmax is the key's, and
    the sum of their log-likelihoods. A prompt is retrieved when every answer token is a hit."""
    tokens, hits, log_likelihood = sums
    retrieved = (hits == tokens) & (tokens > 0)
    accuracy, mean_ll = {}, {}
    for cell in dict.fromkeys(prompts.cells):
        mine = torch.tensor([c == cell for c in prompts.cells])
        accuracy[cell] = float(retrieved[mine].double().mean())
        mean_ll[cell] = float(log_likelihood[mine].sum() / tokens[mine].sum())
    return PasskeyTable(accuracy=accuracy, log_likelihood=mean_ll, lengths=prompts.lengths)
