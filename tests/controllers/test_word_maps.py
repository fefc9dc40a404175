"""WordMapSums: the word maps LocalBlend and the mask-guided shared-attention controllers read."""

import pytest
import torch

from attnkit import AttnkitError, Controller, generate
from attnkit.controllers.word_maps import WordMapSums, default_grid
from attnkit.testing import tiny_pipeline
from attnkit.tokens import word_token_indices


def test_default_grid_is_the_largest_of_at_most_a_quarter_of_the_latent_or_16():
    assert default_grid([8, 16, 32, 64], (64, 64)) == 16  # SD at 512 px
    assert default_grid([16, 32, 64, 128], (128, 128)) == 32  # SDXL at 1024 px
    assert default_grid([4, 8], (16, 16)) == 8  # small models: up to 16
    assert default_grid([32, 64], (16, 16)) == 32  # nothing fits: the smallest


class Reader(Controller):
    """Sums the maps of ``tokens`` the way an oracle would: conditional rows, mean over heads."""

    def __init__(self, sums, tokens):
        self.sums, self.tokens, self.oracle, self.calls = sums, tokens, {}, {}

    def on_enter(self, ctl):
        self.sums.reset()

    def observe(self, call):
        self.sums.observe(call)
        if call.is_cross:
            side = max(call.height, call.width)
            probs = call.probs(call.layout.cond_rows).float().mean(dim=1)
            maps = torch.stack([probs[i][:, t].sum(-1) for i, t in enumerate(self.tokens)])
            maps = maps.reshape(-1, 1, call.height, call.width)
            self.oracle[side] = self.oracle.get(side, 0) + maps
            self.calls[side] = self.calls.get(side, 0) + 1


def test_sums_equal_an_explicit_oracle_and_name_the_grids_when_res_is_wrong():
    pipe = tiny_pipeline()
    prompts = ["a red circle", "a blue square"]
    tokens = [word_token_indices(pipe.tokenizer, p, w) for p, w in zip(prompts, ["circle", "square"], strict=True)]
    reader = Reader(WordMapSums([tokens, tokens], None, "Reader"), tokens)
    generate(pipe, prompts, reader, steps=2, progress=False)
    side = reader.sums.choose((16, 16))
    assert side == default_grid(list(reader.oracle), (16, 16))
    (first, second), calls = reader.sums.get()
    assert calls == reader.calls[side]
    torch.testing.assert_close(first, reader.oracle[side])
    torch.testing.assert_close(second, first)
    wrong = WordMapSums([tokens], 3, "Reader")
    generate(pipe, prompts, Reader(wrong, tokens), steps=1, progress=False)
    with pytest.raises(AttnkitError, match=r"Reader res=3: the cross-attention grids are \[.*\]; pick one"):
        wrong.choose((16, 16))
    with pytest.raises(AttnkitError, match="has 2 prompts but Reader was built for 3"):
        generate(pipe, prompts, Reader(WordMapSums([tokens + [[1]]], None, "Reader"), tokens), steps=1,
                 progress=False)
