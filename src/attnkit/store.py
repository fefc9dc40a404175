"""AttentionStore: record cross- and self-attention maps while a pipeline samples.

    with attnkit.control(pipe, store := AttentionStore(res=16)) as ctl:
        image = pipe("a red circle and a blue square", callback_on_step_end=ctl.callback).images[0]
    heat = store.word_maps("a red circle and a blue square")     # {"red": 16x16 tensor, ...}

The store keeps a running sum per layer over the selected steps (memory does not grow with the number of
steps) and reads only the conditional half of a classifier-free-guidance batch by default. Reading never
changes the generated image: the maps are computed beside the fused attention (see ``engine.py``).

For the big self-attention maps (SD1.5 at 512 px: 4096 x 4096 per layer) ``combine_layers=True`` keeps one
running sum per kind and grid size instead of one per layer, and the head mean is always taken in blocks of
query rows (:data:`CHUNK_BYTES`), so no per-head, per-layer or per-step copy of a map ever exists::

    store = AttentionStore(kinds="self", res=None, combine_layers=True)   # what attnkit.segment uses
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from attnkit.engine import AttentionCall, AttnkitError, Control, Controller, LayerInfo, Selection
from attnkit.tokens import word_spans, word_token_indices

Kind = Literal["cross", "self"]
# Largest block of probabilities (bytes, float32) the head mean materialises at once: the 4096-query self-attention
# of SD1.5 at 512 px is 8 heads x 4096 x 4096 x 4 B = 512 MiB per image, so it is read in blocks of query rows.
CHUNK_BYTES = 32 * 2**20


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
        combine_layers: one running sum per kind and grid size (keys like ``"self 16x16"``) instead of one per
            layer: memory no longer grows with the number of layers; :meth:`maps` is unchanged (a mean over
            layers), :meth:`layer_maps` then returns one map per grid size.
    """

    def __init__(self, kinds: Kind | Sequence[Kind] = ("cross",), res: int | Sequence[int] | None = 16,
                 places: str | Sequence[str] = ("down", "mid", "up"), layers: int | str | Sequence | None = None,
                 steps: int | float | tuple | None = None, rows: Literal["cond", "uncond", "all"] = "cond",
                 keep_heads: bool = False, combine_layers: bool = False) -> None:
        if rows not in ("cond", "uncond", "all"):
            raise AttnkitError(f"rows={rows!r}: use 'cond', 'uncond' or 'all'")
        self.selection = Selection(kinds=_as_tuple(kinds), res=_as_tuple(res), places=_as_tuple(places),
                                   layers=_as_tuple(layers), steps=steps)
        self.rows = rows
        self.keep_heads = keep_heads
        self.combine_layers = combine_layers
        self.tokenizer: Any = None
        self.reset()

    def reset(self) -> None:
        """Forget everything stored."""
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.layers: dict[str, tuple[LayerInfo, int, int]] = {}
        self.members: dict[str, set[str]] = {}  # layer names summed under each key
        self.steps_seen: set[int] = set()

    # -- controller hooks -------------------------------------------------------------------------------
    def on_enter(self, ctl: Control) -> None:
        self.reset()
        self.tokenizer = ctl.text_tokenizer  # its positions are the cross-attention key columns

    def observe(self, call: AttentionCall) -> None:
        if not self.selection.matches(call):
            return
        rows = call.layout.rows(self.rows)
        name = call.layer.name
        key = f"{call.layer.kind} {call.height}x{call.width}" if self.combine_layers else name
        if key not in self.sums:
            self.sums[key] = None  # type: ignore[assignment]  # allocated by the first accumulation
            self.counts[key] = 0
            self.layers[key] = (call.layer, call.height, call.width)
            self.members[key] = set()
        if self.keep_heads:
            probs = call.probs(rows).detach().float()
            self.sums[key] = probs.clone() if self.sums[key] is None else self.sums[key].add_(probs)
        else:
            self.sums[key] = accumulate_head_mean(call, rows, self.sums[key])
        self.counts[key] += 1
        self.members[key].add(name)
        self.steps_seen.add(call.step)

    # -- results ----------------------------------------------------------------------------------------
    def layer_maps(self, kind: Kind = "cross") -> dict[str, torch.Tensor]:
        """Step-averaged maps per layer: ``(rows, [heads,] h, w, keys)``, keyed by layer name (with
        ``combine_layers``: averaged over the layers too, one map per grid size, keyed ``"self 16x16"``)."""
        out = {}
        for name, total in self.sums.items():
            layer, h, w = self.layers[name]
            if layer.kind == kind:
                mean = total / self.counts[name]
                out[name] = mean.reshape(*mean.shape[:-2], h, w, mean.shape[-1])
        return out

    def layer_weights(self) -> dict[str, int]:
        """How many layers each stored key sums (1 per key unless ``combine_layers``)."""
        return {key: len(names) for key, names in self.members.items()}

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
        weights = self.layer_weights()
        total, count = None, 0
        for name, m in per_layer.items():  # a mean over layers: a combined key counts as its layers
            if m.shape[1:3] != (height, width):
                m = F.interpolate(m.permute(0, 3, 1, 2), size=(height, width), mode="bilinear",
                                  align_corners=False).permute(0, 2, 3, 1)
            m = m * weights[name]
            total = m if total is None else total + m
            count += weights[name]
        return total / count

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


def accumulate_head_mean(call: AttentionCall, rows: slice, into: torch.Tensor | None) -> torch.Tensor:
    """Add the head mean of ``call``'s probabilities ``(rows, queries, keys)`` (float32) to ``into`` (allocated
    when None) and return it. Probabilities are computed in blocks of query rows of at most
    :data:`CHUNK_BYTES`, so the per-head block of a big self-attention layer never exists whole."""
    query, key = call.query[rows].detach(), call.key[rows].detach()
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    if into is None:
        into = torch.zeros(batch, queries, keys, dtype=torch.float32, device=query.device)
    block = max(1, CHUNK_BYTES // max(1, batch * heads * keys * 4))
    mask = None if call.mask is None else call.mask[rows]
    for start in range(0, queries, block):
        part = slice(start, start + block)
        if call.edited is not None:  # a controller before this one rewrote the maps: read its version
            probs = call.edited[rows][:, :, part].detach()
        else:
            scores = torch.matmul(query[:, :, part], key.transpose(-1, -2)) * call.scale
            if mask is not None:
                scores = scores + (mask[:, :, part] if mask.shape[2] == queries else mask)
            probs = scores.softmax(dim=-1)
        into[:, part] += probs.float().mean(dim=1)
    return into
