"""Tests of the shapes-world CLIP tokenizer."""

from pathlib import Path

from transformers import AutoTokenizer, CLIPTokenizer

from attnkit.bundled.scenes import VOCABULARY, ObjectSpec, Prompt, SceneSpec, render_scene
from attnkit.bundled.tokenizer import MODEL_MAX_LENGTH, SPLIT_WORDS, build_tokenizer, object_word_tokens

MODEL = Path(__file__).resolve().parents[2] / "src" / "attnkit" / "bundled" / "model"


def test_round_trip_and_vocabulary(tmp_path):
    build_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == MODEL_MAX_LENGTH
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    for w in VOCABULARY:
        ids = tok(w, add_special_tokens=False).input_ids
        assert unk not in ids, w
        assert len(ids) == (len(SPLIT_WORDS[w]) if w in SPLIT_WORDS else 1), (w, tok.tokenize(w))
    for seed in range(10_000_000, 10_000_050):
        cap = render_scene(seed).caption
        ids = tok(cap, padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == MODEL_MAX_LENGTH and ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == cap


def test_multi_token_word_exists(tmp_path):
    tok = build_tokenizer(tmp_path)
    assert len(tok.tokenize("outlined")) == 2
    assert len(tok.tokenize("background")) == 2
    longest = "a purple outlined triangle and a yellow outlined diamond and a green outlined square on a grey background"
    assert len(tok(longest).input_ids) <= MODEL_MAX_LENGTH


def test_object_word_tokens_follow_the_caption(tmp_path):
    tok = build_tokenizer(tmp_path)
    spec = SceneSpec("black", (ObjectSpec("circle", "red", "solid", (20, 20), 10),
                               ObjectSpec("circle", "blue", "outlined", (44, 44), 10)))
    # <bos> a red circle and a blue out lined circle on a black back ground
    #   0   1  2    3     4  5   6   7    8     9    10 11  12    13   14
    assert object_word_tokens(tok, spec) == [{"color": [2], "fill": [], "shape": [3]},
                                             {"color": [6], "fill": [7, 8], "shape": [9]}]


def test_an_is_two_existing_tokens_and_changes_no_id(tmp_path):
    tok = build_tokenizer(tmp_path)
    assert tok.tokenize("an outlined square") == ["a", "n</w>", "out", "lined</w>", "square</w>"]
    assert "a" in tok.get_vocab() and "n</w>" in tok.get_vocab()  # byte-level tokens, there before "an"
    shipped = AutoTokenizer.from_pretrained(MODEL / "tokenizer")
    assert len(tok) == len(shipped)
    for cap in ("a red outlined circle and an outlined square", "a circle and a blue square on a grey background"):
        assert tok(cap).input_ids == shipped(cap).input_ids


def test_object_word_tokens_of_open_captions(tmp_path):
    tok = build_tokenizer(tmp_path)
    spec = SceneSpec("black", (ObjectSpec("circle", "red", "outlined", (20, 20), 10),
                               ObjectSpec("circle", "blue", "outlined", (44, 44), 10)))
    # <bos> a n out lined circle and a blue out lined circle
    #   0   1 2  3    4     5     6  7  8    9   10    11
    expected = [{"color": [], "fill": [3, 4], "shape": [5]}, {"color": [8], "fill": [9, 10], "shape": [11]}]
    assert object_word_tokens(tok, spec, [0]) == expected
    assert object_word_tokens(tok, Prompt(spec, (0,), True)) == expected
    # a repeated shape is found in its own phrase, not the first occurrence
    assert object_word_tokens(tok, spec, [0, 1])[1] == {"color": [], "fill": [9, 10], "shape": [11]}
