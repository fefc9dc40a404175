"""AttentionStore: record cross- and self-attention maps while a pipeline samples.

    with attnkit.control(pipe, store := AttentionStore(res=16)) as ctl:
        image = pipe("a red circle and a blue square", callback_on_step_end=ctl.callback).images[0]
    heat = store.word_maps("a red circle and a blue square")     # {"red": 16x16 tensor, ...}

The store keeps a running sum per layer over the selected steps (memory does not grow with the number of
steps) and reads only the conditional half of a classifier-free-guidance batch by default. Reading never
changes the generated image: the maps are computed beside the fused attention (see ``engine.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from attnkit.engine import AttentionCall, AttnkitError, Control, Controller, LayerInfo, Selection
from attnkit.tokens import word_spans, word_token_indices

Kind = Literal["cross", "self"]


def _as_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, (list, tuple, set)) else (value,)


class AttentionStore(Controller):
    """Sum attention probabilities over steps, per layer, for the layers and steps selected.

    Args:
        kinds: ``"cross"``, ``"self"`` or both.
        res: grid size(s) to keep (the larger side of a layer's query grid), e.g. ``16`` or ``(16, 32)``;
            ``None`` keeps every resolution.
        places: any of ``"down"``, ``"mid"``, ``"up"``.
        layers: forward-order layer indices or layer names (``"layer 35 of 70"`` → ``layers=35``).
        steps: step window: ``(30, 50)`` (indices), ``(0.6, 1.0)`` (fractions), ``0.6`` (the step nearest
            t = 0.6 of the schedule) or an int (one step).
        rows: ``"cond"`` (default), ``"uncond"`` or ``"all"`` rows of the UNet batch.
        keep_heads: keep per-head maps instead of their mean (uses ``heads`` times more memory).
    """

    def __init__(self, kinds: Kind | Sequence[Kind] = ("cross",), res: int | Sequence[int] | None = 16,
                 places: str | Sequence[str] = ("down", "mid", "up"), layers: int | str | Sequence | None = None,
                 steps: int | float | tuple | None = None, rows: Literal["cond", "uncond", "all"] = "cond",
                 keep_heads: bool = False) -> None:
        if rows not in ("cond", "uncond", "all"):
            raise AttnkitError(f"rows={rows!r}: use 'cond', 'uncond' or 'all'")
        self.selection = Selection(kinds=_as_tuple(kinds), res=_as_tuple(res), places=_as_tuple(places),
                                   layers=_as_tuple(layers), steps=steps)
        self.rows = rows
        self.keep_heads = keep_heads
        self.tokenizer: Any = None
        self.reset()

    def reset(self) -> None:
        """Forget everything stored."""
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.layers: dict[str, tuple[LayerInfo, int, int]] = {}
        self.steps_seen: set[int] = set()

    # -- controller hooks -------------------------------------------------------------------------------
    def on_enter(self, ctl: Control) -> None:
        self.reset()
        self.tokenizer = getattr(ctl.pipe, "tokenizer", None)

    def observe(self, call: AttentionCall) -> None:
        if not self.selection.matches(call):
            return
        probs = call.probs(call.layout.rows(self.rows)).detach().float()
        if not self.keep_heads:
            probs = probs.mean(dim=1)
        name = call.layer.name
        if name in self.sums:
            self.sums[name] += probs
            self.counts[name] += 1
        else:
            self.sums[name] = probs.clone()
            self.counts[name] = 1
            self.layers[name] = (call.layer, call.height, call.width)
        self.steps_seen.add(call.step)

    # -- results ----------------------------------------------------------------------------------------
    def layer_maps(self, kind: Kind = "cross") -> dict[str, torch.Tensor]:
        """Step-averaged maps per layer: ``(rows, [heads,] h, w, keys)``, keyed by layer name."""
        out = {}
        for name, total in self.sums.items():
            layer, h, w = self.layers[name]
            if layer.kind == kind:
                mean = total / self.counts[name]
                out[name] = mean.reshape(*mean.shape[:-2], h, w, mean.shape[-1])
        return out

    def maps(self, kind: Kind = "cross", res: int | None = None) -> torch.Tensor:
        """Maps averaged over the stored layers (and heads): ``(rows, H, W, keys)``.

        Cross-attention layers of different resolutions are resized (bilinear) to the largest one before
        averaging; self-attention maps are averaged only within one resolution (``res``, default the largest).
        """
        per_layer = self.layer_maps(kind)
        if res is not None:
            per_layer = {n: m for n, m in per_layer.items() if max(self.layers[n][1:]) == res}
        if not per_layer:
            stored = sorted({f"{info.kind} {h}x{w}" for info, h, w in self.layers.values()})
            raise AttnkitError(f"no {kind}-attention maps{f' at {res}' if res else ''} were stored (stored: "
                               f"{', '.join(stored) or 'nothing'}); check the store's kinds/res/steps and that "
                               "the pipeline ran inside attnkit.control(...)")
        if self.keep_heads:
            per_layer = {n: m.mean(dim=1) for n, m in per_layer.items()}
        if kind == "self" and res is None:
            largest = max(max(self.layers[n][1:]) for n in per_layer)
            per_layer = {n: m for n, m in per_layer.items() if max(self.layers[n][1:]) == largest}
        height = max(m.shape[1] for m in per_layer.values())
        width = max(m.shape[2] for m in per_layer.values())
        resized = []
        for m in per_layer.values():
            if m.shape[1:3] != (height, width):
                m = F.interpolate(m.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            resized.append(m)
        return torch.stack(resized).mean(dim=0)

    def token_maps(self, row: int = 0, res: int | None = None) -> torch.Tensor:
        """Cross-attention map of every token position of prompt ``row``: ``(keys, H, W)``."""
        return self.maps("cross", res)[row].permute(2, 0, 1)

    def word_maps(self, prompt: str, row: int = 0, words: Sequence[str] | None = None,
                  res: int | None = None) -> dict[str, torch.Tensor]:
        """``{word: (H, W) map}`` for the words of ``prompt`` (the prompt generated in ``row``).

        A word split into several tokens gets the mean of its tokens' maps; a repeated word, the mean over
        its occurrences.
        """
        tokenizer = self._tokenizer()
        tokens = self.token_maps(row, res)
        names = list(words) if words is not None else [s.word for s in word_spans(tokenizer, prompt)]
        return {w: tokens[word_token_indices(tokenizer, prompt, w)].mean(dim=0) for w in dict.fromkeys(names)}

    def word_map(self, prompt: str, word: str, row: int = 0, res: int | None = None) -> torch.Tensor:
        """The ``(H, W)`` map of one word of ``prompt``."""
        return self.word_maps(prompt, row, [word], res)[word]

    def self_map(self, pixel: tuple[int, int], row: int = 0, res: int | None = None) -> torch.Tensor:
        """Where query pixel ``(y, x)`` (in the self-attention grid) attends: an ``(h, w)`` map."""
        maps = self.maps("self", res)[row]
        h, w = maps.shape[:2]
        y, x = pixel
        if not (0 <= y < h and 0 <= x < w):
            raise AttnkitError(f"pixel {pixel} is outside the {h}x{w} self-attention grid")
        return maps[y, x].reshape(h, w)

    def self_components(self, row: int = 0, k: int = 6, res: int | None = None) -> torch.Tensor:
        """The top ``k`` principal components of the self-attention matrix, as ``(k, h, w)`` maps (the
        Prompt-to-Prompt notebook's view of what self-attention groups together)."""
        maps = self.maps("self", res)[row]
        h, w = maps.shape[:2]
        matrix = maps.reshape(h * w, h * w).double()
        _, _, vh = torch.linalg.svd(matrix - matrix.mean(dim=1, keepdim=True))
        return vh[:k].reshape(-1, h, w).float()

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise AttnkitError("the store has no tokenizer: run it inside attnkit.control(pipe, store) first")
        return self.tokenizer
