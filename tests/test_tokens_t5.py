"""Token positions with a sentencepiece (T5) tokenizer and with SD3's CLIP + T5 key columns."""

import pytest
import torch

from attnkit import AttnkitError
from attnkit.testing import TEST_WORDS, build_clip_tokenizer, build_t5_tokenizer
from attnkit.tokens import (
    Segment,
    SegmentedTokenizer,
    check_prompt_length,
    equalizer,
    refine_mapper,
    swap_mapper,
    token_limit,
    token_strings,
    word_spans,
    word_token_indices,
)


@pytest.fixture(scope="module")
def t5():
    return build_t5_tokenizer(TEST_WORDS, model_max_length=16, keep_split=["sunglasses"])


@pytest.fixture(scope="module")
def sd3(t5):
    clip = build_clip_tokenizer(TEST_WORDS, keep_split=["sunglasses"])
    return SegmentedTokenizer([Segment(clip, 77), Segment(t5, 16)], "SD3")


def test_t5_words_start_at_zero_and_split_words_span_two_tokens(t5):
    # T5 has no start token: the first word is column 0, the end-of-sequence token follows the last word.
    spans = word_spans(t5, "a cat wearing sunglasses")
    assert [(s.word, s.tokens) for s in spans] == [("a", (0,)), ("cat", (1,)), ("wearing", (2,)),
                                                  ("sunglasses", (3, 4))]
    ids = t5("a cat wearing sunglasses", padding="max_length", max_length=16).input_ids
    assert ids[5] == t5.eos_token_id and ids[6] == t5.pad_token_id
    assert token_strings(t5, "a cat")[:2] == ["a", "cat"]


def test_t5_prompt_too_long_is_refused(t5):
    assert check_prompt_length(t5, " ".join(["cat"] * 15)) == 16  # 15 words + end token: fits exactly
    with pytest.raises(AttnkitError, match="17 tokens long but the model reads at most 16"):
        check_prompt_length(t5, " ".join(["cat"] * 16))


def test_segmented_positions_cover_clip_then_t5(sd3):
    assert token_limit(sd3) == 77 + 16
    # CLIP: start token 0, "red" 2; T5: no start token, "red" at 77 + 1.
    assert word_token_indices(sd3, "a red cat", "red") == [2, 77 + 1]
    assert word_token_indices(sd3, "a cat wearing sunglasses", "sunglasses") == [4, 5, 77 + 3, 77 + 4]
    labels = token_strings(sd3, "a red cat")
    assert len(labels) == 93 and labels[2] == "red" and labels[78] == "red" and labels[92] == ""
    with pytest.raises(AttnkitError, match="in its T5Tokenizer part"):
        check_prompt_length(sd3, " ".join(["cat"] * 20))  # fits CLIP's 77, not the 16 T5 columns
    eq = equalizer(sd3, "a red cat", {"red": 3.0})
    assert eq[2] == 3 and eq[78] == 3 and eq.sum() == 93 + 4


def test_segmented_mappers_are_per_segment_blocks(sd3):
    src, tgt = "a cat wearing sunglasses", "a dog wearing red"
    mapper = swap_mapper(sd3, src, tgt)
    clip_part = swap_mapper(sd3.segments[0].tokenizer, src, tgt)
    assert mapper.shape == (93, 93)
    assert torch.equal(mapper[:77, :77], clip_part)
    assert mapper[:77, 77:].abs().sum() == 0 and mapper[77:, :77].abs().sum() == 0
    # T5 block: "sunglasses" (3, 4) → "red" (3); the end token 5 → 4.
    t5_block = mapper[77:, 77:]
    assert t5_block[3, 3] == 1 and t5_block[4, 3] == 1 and t5_block[5, 4] == 1 and t5_block[0, 0] == 1
    index, alpha = refine_mapper(sd3, "a cat", "a red cat")
    assert alpha[2] == 0 and index[3] == 2  # CLIP: "red" added, "cat" from position 2
    assert alpha[77 + 1] == 0 and index[77 + 2] == 77 + 1  # T5: the same, offset by 77
    assert alpha[77 + 3] == 1 and index[77 + 3] == 77 + 2  # the end token follows "cat"
