"""Prompt-to-Prompt token alignment: swap mapper, Needleman–Wunsch refinement mapper, equalizer, schedules."""

import pytest
import torch

from attnkit import AttnkitError
from attnkit.controllers import cross_alpha, self_window
from attnkit.testing import build_clip_tokenizer
from attnkit.tokens import equalizer, needleman_wunsch, refine_mapper, swap_mapper

WORDS = "a cat dog wearing red cake lego lemon chocolate sunglasses on field".split()


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer(WORDS, keep_split=["sunglasses"])


def test_swap_with_equal_token_counts_is_the_identity(tok):
    assert torch.equal(swap_mapper(tok, "a lemon cake", "a chocolate cake"), torch.eye(77))


def test_swap_with_different_token_counts_keeps_mass_and_aligns_the_tail(tok):
    src, tgt = "a cat wearing sunglasses on a field", "a dog wearing red on a field"
    m = swap_mapper(tok, src, tgt)
    # sunglasses = tokens 4, 5 in the source; red = token 4 in the target
    assert m[4, 4] == 1 and m[5, 4] == 1
    # the words after the swap and the end-of-text token keep their meaning (shifted by one), unlike the
    # official diagonal fill, which maps source "on" (6) to target "a" (6)
    assert m[6, 5] == 1 and m[7, 6] == 1 and m[8, 7] == 1 and m[9, 8] == 1  # on, a, field, end-of-text
    assert m[6, 6] == 0
    source_map = torch.softmax(torch.randn(3, 77), dim=-1)
    torch.testing.assert_close((source_map @ m).sum(-1), torch.ones(3))  # every source position lands
    assert m[:, 76].sum() == 0  # the target's last padding position has no source
    back = swap_mapper(tok, tgt, src)  # one token to two: each target token gets half
    assert back[4, 4] == 0.5 and back[4, 5] == 0.5 and back[5, 6] == 1 and back[8, 9] == 1
    lost = source_map[:, 76]  # the source's last padding position has no target position left
    torch.testing.assert_close((source_map @ back).sum(-1), 1 - lost)


def test_swap_needs_equal_word_counts(tok):
    with pytest.raises(AttnkitError, match="same number of words.*Refine"):
        swap_mapper(tok, "a cake", "a lego cake")


def test_needleman_wunsch_matches_official_choices():
    assert needleman_wunsch([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]  # insertion
    assert needleman_wunsch([1, 2, 9, 3], [1, 2, 3]) == [0, 1, 3]  # deletion
    assert needleman_wunsch([1, 2, 3], [1, 7, 3]) == [0, -1, 2]  # gap 0 beats a -1 mismatch
    assert needleman_wunsch([], [4, 5]) == [-1, -1]


def test_refine_mapper(tok):
    index, alpha = refine_mapper(tok, "a cake", "a lego cake")
    assert index[:5].tolist() == [0, 1, 0, 2, 3] and alpha[:5].tolist() == [1, 1, 0, 1, 1]
    assert index[5:].tolist() == list(range(5, 77)) and alpha[5:].eq(1).all()
    index, alpha = refine_mapper(tok, "a lemon cake on a field", "a cake")
    assert index[:4].tolist() == [0, 1, 3, 7] and alpha[:4].eq(1).all()


def test_equalizer(tok):
    eq = equalizer(tok, "a cat wearing sunglasses", {"sunglasses": -2.0, "cat": 3})
    assert eq[4] == -2 and eq[5] == -2 and eq[2] == 3 and eq.sum() == 77 - 3 + 3 - 4
    with pytest.raises(AttnkitError, match="'dog' is not a word"):
        equalizer(tok, "a cat", {"dog": 2.0})


def test_cross_schedule_forms(tok):
    n = 10
    a = cross_alpha(tok, ["a lego cake"], 0.8, n)
    assert a.shape == (n, 1, 77)
    assert a[:, 0, 0].tolist() == [1.0] * int(0.8 * (n + 1)) + [0.0] * (n - int(0.8 * (n + 1)))
    b = cross_alpha(tok, ["a lego cake"], (0.2, 0.5), n)
    assert b[:, 0, 3].nonzero().flatten().tolist() == list(range(int(0.2 * 11), int(0.5 * 11)))
    c = cross_alpha(tok, ["a lego cake", "a lemon cake"], {"default_": 1.0, "lego": 0.3}, n)
    assert c[:, 0, 2].sum() == int(0.3 * 11) and c[:, 0, 3].sum() == n and c[:, 1, 2].sum() == n
    with pytest.raises(AttnkitError, match="'beet', which is not a word of any target"):
        cross_alpha(tok, ["a lego cake"], {"beet": 0.5}, n)
    with pytest.raises(AttnkitError, match="0 <= start <= end <= 1"):
        cross_alpha(tok, ["a lego cake"], (0.6, 0.2), n)


def test_self_window():
    assert self_window(0.4, 50) == (0, 20)
    assert self_window((0.2, 0.7), 10) == (2, 7)
    with pytest.raises(AttnkitError):
        self_window(1.5, 10)
