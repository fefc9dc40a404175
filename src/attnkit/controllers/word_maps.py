"""Word maps read from cross-attention while sampling, on one grid: what LocalBlend (Prompt-to-Prompt) and the
mask-guided shared-attention controllers (MasaCtrl's masks, ConsiStory's subject) turn into masks.

    sums = WordMapSums([tokens], res=None, owner="LocalBlend")   # tokens[i]: positions of the words in prompt i
    sums.observe(call)                                           # on every attention call
    side = sums.choose(latent_hw)                                # at a step's end (the grid is fixed from then)
    (maps,), calls = sums.get()                                  # (prompts, 1, h, w) summed over calls
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from attnkit.engine import AttentionCall, AttnkitError


def default_grid(sides: Sequence[int], latent_hw: tuple[int, int]) -> int:
    """Prompt-to-Prompt reads the 16x16 maps of SD at 512 px (latent / 4): the largest grid of at most
    ``max(16, latent side / 4)`` (32 for SDXL at 1024 px, 16 for small models), else the smallest there is."""
    fitting = [side for side in sides if side <= max(16, max(latent_hw) // 4)]
    return max(fitting) if fitting else min(sides)


class WordMapSums:
    """Per grid side, the running sum over cross-attention calls of each token set's map (the conditional rows,
    mean over heads, summed over the set's tokens of each prompt) and the number of calls summed.

    ``token_sets`` is a list of token sets; a set holds one list of token positions per prompt. ``res`` fixes the
    grid (side length); ``None`` lets :meth:`choose` pick :func:`default_grid` at the first step's end. ``owner``
    names the controller in errors."""

    def __init__(self, token_sets: Sequence[list[list[int]]], res: int | None, owner: str) -> None:
        self.token_sets, self.res, self.owner = list(token_sets), res, owner
        self.prompts = len(self.token_sets[0])
        self.reset()

    def reset(self) -> None:
        """Forget every sum and the chosen grid (a new generation)."""
        self.chosen: int | None = self.res
        self.sums: dict[int, list[Any]] = {}  # grid side -> [map sum of each token set (P, 1, h, w)..., calls]
        self.seen: set[int] = set()  # every cross-attention grid side met, for the error naming them

    def observe(self, call: AttentionCall) -> None:
        if not call.is_cross:
            return
        side = max(call.height, call.width)
        self.seen.add(side)
        if self.chosen is not None and side != self.chosen:
            return
        if call.layout.prompts != self.prompts:
            raise AttnkitError(f"the batch has {call.layout.prompts} prompts but {self.owner} was built for "
                               f"{self.prompts}; build it with the prompts you generate")
        probs = call.probs(call.layout.cond_rows).float().mean(dim=1)  # (prompts, queries, keys)
        maps = [torch.einsum("pqk,pk->pq", probs, _selector(tokens, probs)).reshape(-1, 1, call.height, call.width)
                for tokens in self.token_sets]
        entry = self.sums.get(side)
        if entry is None:
            self.sums[side] = [*maps, 1]
        else:
            self.sums[side] = [total + m for total, m in zip(entry[:-1], maps, strict=True)] + [entry[-1] + 1]

    def choose(self, latent_hw: tuple[int, int]) -> int:
        """The grid the maps are read on (chosen at the first call, then fixed); sums of other grids dropped."""
        if not self.seen:
            raise AttnkitError(f"{self.owner} saw no cross-attention maps; it needs a model with cross-attention")
        if self.chosen is None:
            self.chosen = default_grid(list(self.sums), latent_hw)
        if self.chosen not in self.sums:
            raise AttnkitError(f"{self.owner} res={self.chosen}: the cross-attention grids are {sorted(self.seen)}; "
                               "pick one of them")
        self.sums = {self.chosen: self.sums[self.chosen]}
        return self.chosen

    def get(self) -> tuple[list[torch.Tensor], int]:
        """The chosen grid's map sums (one per token set) and the number of calls they sum."""
        *maps, calls = self.sums[self.chosen]
        return maps, calls


def _selector(tokens: list[list[int]], probs: torch.Tensor) -> torch.Tensor:
    select = torch.zeros(probs.shape[0], probs.shape[-1], device=probs.device)
    for i, positions in enumerate(tokens):
        select[i, positions] = 1.0
    return select
