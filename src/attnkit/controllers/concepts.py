"""ConceptAttention (Helbling et al., ICML 2025; helblazer811/ConceptAttention): concept saliency in the
attention *output* space of an MM-DiT's double-stream blocks.

    ca = ConceptAttention(attnkit.embed_concepts(pipe, ["circle", "square", "background"]))
    attnkit.generate(pipe, "a red circle and a blue square", ca)
    maps = ca.maps()          # (concepts, h, w): softmax over the concepts, averaged over layers and steps

Concept tokens ride the text stream of every double-stream block (:meth:`Controller.extra_text_tokens`): they
go through the text weights and attend to ``[concepts; image]``, and no image or text token attends to them,
so the image is unchanged. At each selected block and step the saliency of concept ``c`` at image token ``p`` is
``softmax_c(o_c · o_p)``: the dot product of the concept's and the image token's attention outputs (all heads
concatenated, before the output projection), as the official ``compute_heatmaps_from_vectors``; the maps are
the mean of those softmaxes over the selected blocks and steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from attnkit.engine import AttentionCall, AttnkitError, Control, Controller, step_in_window

# The paper reads FLUX.1's double blocks 15-18 of 19: the last 4/19 of the double stream.
PAPER_BLOCKS = (15, 16, 17, 18)
PAPER_DEPTH = 19


def default_blocks(depth: int) -> tuple[int, ...]:
    """The paper's layers expressed relative to the model's depth: the last ``round(depth · 4/19)`` (at least
    one) double-stream blocks. ``default_blocks(19) == (15, 16, 17, 18)``; ``default_blocks(24)`` → 19..23."""
    if depth < 1:
        raise AttnkitError("the model has no double-stream blocks for concept attention")
    count = max(1, round(depth * len(PAPER_BLOCKS) / PAPER_DEPTH))
    return tuple(range(depth - count, depth))


class ConceptAttention(Controller):
    """Concept saliency maps from the attention outputs of concept tokens and image tokens.

    Args:
        tokens: ``(concepts, dim)`` concept embeddings in the pipeline's prompt-embedding space
            (:func:`attnkit.embed_concepts`).
        blocks: double-stream block indices to average over (default :func:`default_blocks`: the paper's last
            4 of FLUX.1's 19, relative to the model's depth); negative indices count from the end.
        steps: step window (as :class:`attnkit.Selection`'s); default every step, as the paper.
        rows: ``"cond"`` (default: the conditional half of a guidance batch) or ``"all"``.
    """

    families = ("sd3", "flux")
    family_note = "concept tokens ride the text stream of an MM-DiT's double-stream blocks, which a UNet has not"

    def __init__(self, tokens: torch.Tensor, blocks: Sequence[int] | None = None,
                 steps: int | float | tuple | None = None, rows: Literal["cond", "all"] = "cond") -> None:
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise AttnkitError(f"concept tokens must be (concepts, dim) with at least one concept, got shape "
                               f"{tuple(tokens.shape)}")
        if rows not in ("cond", "all"):
            raise AttnkitError(f"rows={rows!r}: use 'cond' or 'all'")
        self.tokens = tokens
        self.requested = None if blocks is None else tuple(int(b) for b in blocks)
        self.steps = steps
        self.rows = rows
        self.blocks: tuple[int, ...] = ()
        self.reset()

    def reset(self) -> None:
        """Forget the maps summed so far."""
        self.sums: dict[str, torch.Tensor] = {}  # layer name -> (rows, concepts, h*w) sum of per-step softmaxes
        self.counts: dict[str, int] = {}
        self.grid: tuple[int, int] | None = None
        self.steps_seen: set[int] = set()

    def on_enter(self, ctl: Control) -> None:
        self.reset()
        depth = max((info.blocks for info in ctl.layers.values() if info.stream == "double"), default=0)
        if self.requested is None:
            self.blocks = default_blocks(depth)
            return
        resolved = []
        for b in self.requested:
            index = b + depth if b < 0 else b
            if not 0 <= index < depth:
                raise AttnkitError(f"block {b} does not exist: the model has {depth} double-stream blocks "
                                   f"(0..{depth - 1}, or -1 for the last)")
            resolved.append(index)
        if not resolved:
            raise AttnkitError("no blocks selected for concept attention: pass at least one block index")
        self.blocks = tuple(sorted(set(resolved)))

    def extra_text_tokens(self, ctl: Control) -> torch.Tensor:
        return self.tokens

    def observe_output(self, call: AttentionCall) -> None:
        if call.extra is None or not call.is_cross or call.layer.block not in self.blocks:
            return
        if not step_in_window(call.step, call.num_steps, self.steps):
            return
        rows = call.layout.cond_rows if self.rows == "cond" else slice(None)
        scores = concept_scores(call.extra.output[rows], call.output[rows])
        name = call.layer.name
        self.sums[name] = scores if name not in self.sums else self.sums[name] + scores
        self.counts[name] = self.counts.get(name, 0) + 1
        self.grid = (call.height, call.width)
        self.steps_seen.add(call.step)

    @property
    def layers(self) -> list[str]:
        """The layer views whose maps were averaged."""
        return list(self.sums)

    def maps(self, row: int = 0) -> torch.Tensor:
        """``(concepts, h, w)``: the per-step, per-layer concept softmax averaged over the selected layers and
        steps, for prompt ``row``."""
        if not self.sums or self.grid is None:
            raise AttnkitError("no concept attention was recorded: run the pipeline inside attnkit.control with "
                               "this controller (and check that blocks/steps select something)")
        total = sum(self.sums.values())
        count = sum(self.counts.values())
        mean = total / count
        if not 0 <= row < mean.shape[0]:
            raise AttnkitError(f"row {row} does not exist: {mean.shape[0]} prompt rows were recorded")
        return mean[row].reshape(-1, *self.grid)


def concept_scores(concept_out: torch.Tensor, image_out: torch.Tensor) -> torch.Tensor:
    """``softmax over concepts of (o_c · o_p)``: ``concept_out`` ``(B, H, C, d)`` and ``image_out`` ``(B, H, P,
    d)`` attention outputs, heads concatenated for the dot product; returns ``(B, C, P)`` float32."""
    c = concept_out.transpose(1, 2).flatten(2).float()
    p = image_out.transpose(1, 2).flatten(2).float()
    return torch.einsum("bcd,bpd->bcp", c, p).softmax(dim=1)
