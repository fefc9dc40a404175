"""A real ``transformers.CLIPTokenizer`` over the shapes-world vocabulary, built locally (no hub access).

Most grammar words are a single BPE token; ``"outlined"`` (``out`` + ``lined``) and ``"background"``
(``back`` + ``ground``) are deliberately split into two tokens so that multi-token word handling is
exercised by the bundled model.  Like Stable Diffusion, pad = ``<|endoftext|>``.

Usage::

    from attnkit.bundled.tokenizer import build_tokenizer
    tok = build_tokenizer("/tmp/tok")            # writes vocab.json + merges.txt, returns a CLIPTokenizer
    tok("a red circle on a black background").input_ids
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .scenes import VOCABULARY, Prompt

MODEL_MAX_LENGTH = 32  # longest caption is 24 tokens with bos/eos (3 outlined objects); 32 leaves room
# "an" (grammar v2) reuses two byte-level tokens that already exist, so adding it changed no id of the shipped
# tokenizer and the text encoder needs no new embedding row
SPLIT_WORDS: dict[str, tuple[str, ...]] = {"outlined": ("out", "lined"), "background": ("back", "ground"),
                                           "an": ("a", "n")}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (same as the one CLIPTokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges exactly like CLIPTokenizer.bpe (lowest-rank pair first)."""
    word = list(symbols)
    while len(word) > 1:
        pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def build_merges() -> list[tuple[str, str]]:
    """Merges that make every grammar word one token, except the pieces of :data:`SPLIT_WORDS`."""
    pieces: list[tuple[str, bool]] = []  # (text, is word end)
    for w in VOCABULARY:
        if w in SPLIT_WORDS:
            parts = SPLIT_WORDS[w]
            pieces += [(p, False) for p in parts[:-1]] + [(parts[-1], True)]
        else:
            pieces.append((w, True))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for text, end in pieces:
        symbols = list(text[:-1]) + [text[-1] + ("</w>" if end else "")]
        # New merges get the largest ranks, so they never change how earlier pieces are segmented.
        while len(seg := _bpe(symbols, ranks)) > 1:
            pair = (seg[0], seg[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``folder``; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = build_merges()
    # Same id layout as CLIP: 256 byte chars, the same with </w>, merged tokens, then the specials.
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2 - attnkit shapes-world BPE"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: str | Path):
    """Write the tokenizer files to ``folder`` and load them as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(folder)
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tok.save_pretrained(str(folder))
    return tok


def object_word_tokens(tokenizer, spec, open_colors: Iterable[int] = ()) -> list[dict[str, list[int]]]:
    """Token positions of each object's colour, fill and shape words in its caption (caption order); with
    ``open_colors`` (object indices, grammar v2) in ``spec.partial_caption(open_colors)``, where those objects
    have no colour word (``color`` is empty). ``spec`` may also be a :class:`~attnkit.bundled.scenes.Prompt`.

    ``fill`` is empty for solid objects (no fill word). Usage::

        object_word_tokens(pipe.tokenizer, render_scene(10_000_000).spec)[0]["color"]   # e.g. [2]
    """
    from attnkit.tokens import word_spans

    if isinstance(spec, Prompt):
        spec, open_colors, caption = spec.spec, spec.open_colors, spec.caption
    else:
        caption = spec.partial_caption(open_colors)
    open_set = set(open_colors)
    spans = word_spans(tokenizer, caption)
    words = [s.word for s in spans]
    res, i = [], 0
    for k, obj in enumerate(spec.objects):
        article = i + 1 if k else 0  # "a"/"an" opens each object phrase
        si = words.index(obj.shape, article)
        color = [] if k in open_set else list(spans[article + 1].tokens)
        first_fill = article + 1 + (k not in open_set)
        fill = [p for s in spans[first_fill:si] for p in s.tokens]  # "outlined" when present
        res.append({"color": color, "fill": fill, "shape": list(spans[si].tokens)})
        i = si + 1  # "and" follows
    return res
