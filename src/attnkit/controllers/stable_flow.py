"""Stable Flow's attention injection (Avrahami et al., CVPR 2025; snap-research/stable-flow).

    inject = StableFlowInjection(["transformer_blocks.0", "single_transformer_blocks.6"])
    attnkit.generate(pipe, ["a dog standing", "a dog sitting"], inject)   # row 1 keeps row 0's layout

In the chosen blocks (module names of the transformer's blocks, as :func:`attnkit.vital_layers` ranks them) the
image keys and values of every row are replaced by the reference row's (row 0 of each guidance half); the
queries stay each row's own, and the text keys and values too. As in the official FLUX code (``key[1:] =
key[:1]`` on the image tokens of double blocks, ``key[1:, 512:]`` on single blocks) the text queries of those
layers see the injected image keys as well, and the reference row itself is never changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnkit.engine import AttentionCall, AttnkitError, Control, Controller, LayerInfo, step_in_window


def block_of(layer: LayerInfo) -> str:
    """The transformer block a layer view belongs to: ``"transformer_blocks.3"`` for
    ``transformer_blocks.3.attn.self`` (SD3.5's ``attn2`` belongs to its block as well)."""
    return layer.processor.rsplit(".", 2)[0]


class StableFlowInjection(Controller):
    """Inject the reference row's image keys and values into the other rows in ``layers``.

    Args:
        layers: block names (``"transformer_blocks.0"``, ``"single_transformer_blocks.6"``) or indices into
            the model's blocks in forward order (double-stream blocks first); None: every block.
        steps: step window (as :class:`attnkit.Selection`'s); default every step, as the paper.
    """

    families = ("sd3", "flux")
    family_note = "Stable Flow injects into the blocks of an MM-DiT transformer"

    def __init__(self, layers: Sequence[str | int] | None = None,
                 steps: int | float | tuple | None = None) -> None:
        self.requested = None if layers is None else list(layers)
        if self.requested is not None and not self.requested:
            raise AttnkitError("no layers given for Stable Flow's injection: pass block names (see "
                               "attnkit.vital_layers) or None for every block")
        self.steps = steps
        self.blocks: set[str] = set()

    def on_enter(self, ctl: Control) -> None:
        names = list(ctl.adapter.blocks())
        if self.requested is None:
            self.blocks = set(names)
            return
        chosen = set()
        for layer in self.requested:
            if isinstance(layer, int):
                if not 0 <= layer < len(names):
                    raise AttnkitError(f"block index {layer} does not exist: the transformer has {len(names)} "
                                       f"blocks (0..{len(names) - 1})")
                chosen.add(names[layer])
            elif layer in names:
                chosen.add(layer)
            else:
                raise AttnkitError(f"{layer!r} is not a block of this transformer; its blocks are "
                                   f"{names[0]} .. {names[-1]} ({len(names)} in all)")
        self.blocks = chosen

    def edit_qkv(self, call: AttentionCall) -> None:
        if call.is_cross or block_of(call.layer) not in self.blocks:
            return
        if not step_in_window(call.step, call.num_steps, self.steps):
            return
        call.key = inject_reference(call.key, call.layout.halves())
        call.value = inject_reference(call.value, call.layout.halves())


def inject_reference(tensor: torch.Tensor, halves: Sequence[slice]) -> torch.Tensor:
    """A copy of ``tensor`` (rows first) in which every row of each half is that half's first row."""
    out = tensor.clone()
    for half in halves:
        start, stop = half.start or 0, half.stop
        if stop - start > 1:
            out[start + 1:stop] = tensor[start:start + 1]
    return out
