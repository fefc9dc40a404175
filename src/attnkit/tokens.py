"""Words ↔ token positions in a prompt, with the checks users need (unknown word, too-long prompt).

    spans = word_spans(pipe.tokenizer, "a lemon cake")      # [WordSpan("a", [1]), WordSpan("lemon", [2]), ...]
    word_token_indices(pipe.tokenizer, "a lemon cake", "cake")  # [3]

Positions are key columns of the cross-attention maps: with CLIP, the start-of-text token is 0; with T5
(sentencepiece, no start token) the first word starts at 0. Models whose text keys join several encoders
(SD3: 77 CLIP columns, then the T5 columns) take a :class:`SegmentedTokenizer`
(``attnkit.text_tokenizer(pipe)`` builds the right one); every function here accepts either, and a word's
positions are then its tokens in every segment. Words are the prompt's space-separated words, as in
Prompt-to-Prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from attnkit.engine import AttnkitError


@dataclass(frozen=True)
class WordSpan:
    """One space-separated word of a prompt and the token positions it occupies."""

    word: str
    position: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Segment:
    """``length`` key columns numbered by ``tokenizer`` (None: columns no tokenizer names, e.g. SD3's zero
    T5 embeddings when the pipeline has no T5 encoder)."""

    tokenizer: Any
    length: int


class SegmentedTokenizer:
    """Text key columns made of consecutive segments, each numbered by its own tokenizer.

    ``SegmentedTokenizer([Segment(clip, 77), Segment(t5, 256)], "SD3")`` numbers SD3's 333 text columns:
    ``word_token_indices(tok, "a red cat", "red")`` gives the CLIP position (2) and the T5 one (77 + 1).
    ``model_max_length`` is the total column count.
    """

    def __init__(self, segments: Sequence[Segment], name: str = "") -> None:
        self.segments = tuple(segments)
        self.name = name
        if not any(s.tokenizer is not None for s in self.segments):
            raise AttnkitError(f"the {name or 'model'}'s text columns have no tokenizer to number them")

    @property
    def model_max_length(self) -> int:
        return sum(s.length for s in self.segments)

    def parts(self) -> list[tuple[Any, int, int]]:
        """``(tokenizer, first column, length)`` per segment."""
        out, offset = [], 0
        for s in self.segments:
            out.append((s.tokenizer, offset, s.length))
            offset += s.length
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{type(s.tokenizer).__name__}x{s.length}" for s in self.segments)
        return f"SegmentedTokenizer({self.name}: {inner})"


def _parts(tokenizer: Any) -> list[tuple[Any, int, int]]:
    if isinstance(tokenizer, SegmentedTokenizer):
        return tokenizer.parts()
    return [(tokenizer, 0, int(tokenizer.model_max_length))]


def _named_parts(tokenizer: Any) -> list[tuple[Any, int, int]]:
    return [p for p in _parts(tokenizer) if p[0] is not None]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _specials(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens a tokenizer puts before and after the text: CLIP (1, 1), T5 (0, 1)."""
    inner = _encode(tokenizer, "a")
    full = list(tokenizer("a").input_ids)
    for start in range(len(full) - len(inner) + 1):
        if full[start:start + len(inner)] == inner:
            return start, len(full) - start - len(inner)
    return 0, len(full) - len(inner)


def token_limit(tokenizer: Any) -> int:
    """How many tokens (key columns) a prompt may have, start and end tokens included."""
    return int(tokenizer.model_max_length)


def check_prompt_length(tokenizer: Any, prompt: str) -> int:
    """Raise a clear error when ``prompt`` would be truncated; return its token count (with start/end) in the
    first tokenizer."""
    counts = []
    parts = _named_parts(tokenizer)
    for tok, _, limit in parts:
        prefix, suffix = _specials(tok)
        count = len(_encode(tok, prompt)) + prefix + suffix
        if count > limit:
            where = f" in its {type(tok).__name__} part" if len(_parts(tokenizer)) > 1 else ""
            raise AttnkitError(
                f"prompt is {count} tokens long but the model reads at most {limit}{where} (start/end included), "
                f"so its end would be silently cut off: shorten it ({prompt!r})"
            )
        counts.append(count)
    return counts[0]


def _segment_spans(tokenizer: Any, prompt: str, offset: int) -> list[WordSpan]:
    prefix, _ = _specials(tokenizer)
    spans = []
    position = prefix
    for i, word in enumerate(prompt.split()):
        n = len(_encode(tokenizer, word))
        spans.append(WordSpan(word, i, tuple(range(offset + position, offset + position + n))))
        position += n
    if position - prefix != len(_encode(tokenizer, prompt)):
        raise AttnkitError(f"the tokenizer splits {prompt!r} differently word by word than as a whole; "
                           "separate punctuation from words with spaces")
    return spans


def word_spans(tokenizer: Any, prompt: str) -> list[WordSpan]:
    """Token positions of every space-separated word of ``prompt`` (a word may span several tokens; with a
    :class:`SegmentedTokenizer`, its tokens in every segment)."""
    check_prompt_length(tokenizer, prompt)
    per_part = [_segment_spans(tok, prompt, offset) for tok, offset, _ in _named_parts(tokenizer)]
    return [WordSpan(spans[0].word, spans[0].position, tuple(t for s in spans for t in s.tokens))
            for spans in zip(*per_part, strict=True)]


def token_strings(tokenizer: Any, prompt: str) -> list[str]:
    """The prompt's tokens as strings, start and end tokens included (labels for per-token maps). With a
    :class:`SegmentedTokenizer`: one label per key column (``""`` for padding and unnamed columns)."""
    if not isinstance(tokenizer, SegmentedTokenizer):
        return _strings(tokenizer, prompt)
    labels: list[str] = []
    for tok, _, length in tokenizer.parts():
        strings = [] if tok is None else _strings(tok, prompt)[:length]
        labels += strings + [""] * (length - len(strings))
    return labels


def _strings(tokenizer: Any, prompt: str) -> list[str]:
    ids = tokenizer(prompt).input_ids
    return [t.replace("</w>", "").replace("\u2581", "") for t in tokenizer.convert_ids_to_tokens(ids)]


def word_token_indices(tokenizer: Any, prompt: str, word: str | int) -> list[int]:
    """Token positions of ``word`` in ``prompt``: every occurrence of a word string, or the word at an index.

    Raises an error that lists the prompt's words when ``word`` is not among them.
    """
    spans = word_spans(tokenizer, prompt)
    if isinstance(word, int):
        if not 0 <= word < len(spans):
            raise AttnkitError(f"word index {word} is out of range: {prompt!r} has {len(spans)} words")
        return list(spans[word].tokens)
    key = word.strip().lower()
    found = [t for s in spans if s.word.lower() == key for t in s.tokens]
    if not found:
        words = ", ".join(repr(s.word) for s in spans)
        raise AttnkitError(f"{word!r} is not a word of the prompt {prompt!r}; its words are: {words}")
    return found


# -- Prompt-to-Prompt alignment: mappers from a source prompt's tokens to a target prompt's tokens ---------
# Everything below maps token positions of a *source* prompt onto those of a *target* prompt, as the
# Prompt-to-Prompt edits need (Hertz et al., ICLR 2023; google/prompt-to-prompt ``seq_aligner.py``).
# Maps are sized to the tokenizer's full sequence (``model_max_length``: 77 for Stable Diffusion), i.e. to the
# key count of the cross-attention layers.


def swap_mapper(tokenizer: Any, source: str, target: str) -> Any:
    """The word-swap mapper ``M`` (``(L, L)``, L = the token limit): ``target_map = source_map @ M``.

    Usage: ``M = swap_mapper(pipe.tokenizer, "a lemon cake", "a chocolate cake")``

    The prompts must have the same number of space-separated words. An unchanged word maps token by token; a
    swapped word with the same token count maps token ``k`` to token ``k``; with different token counts every
    source token maps to every target token with weight ``1 / len(target tokens)`` (the column sums of the
    swapped word are kept). After the words, end-of-text and padding positions map in order from where each
    prompt's words end. **Differs from the official code on purpose**: its mapper fills everything after the
    last swapped word on the diagonal (``mapper[j, j]``), so after a swap that changes the token count the
    source's end-of-text row and the tail are misaligned; here the tail is shifted by the token-count change.
    Target positions that no source position reaches (the last padding positions when the source is
    longer) get an all-zero column.
    """
    import torch

    source_words, target_words = source.split(), target.split()
    if len(source_words) != len(target_words):
        raise AttnkitError(
            f"a word swap needs prompts with the same number of words, but {source!r} has {len(source_words)} "
            f"and {target!r} has {len(target_words)}; use a refinement (Refine / kind='refine') to add or "
            "remove words"
        )
    check_prompt_length(tokenizer, source)
    check_prompt_length(tokenizer, target)
    limit = token_limit(tokenizer)
    mapper = torch.zeros(limit, limit)
    for tok, offset, length in _parts(tokenizer):  # one block per segment of the key columns
        block = mapper[offset:offset + length, offset:offset + length]
        if tok is None:
            block.copy_(torch.eye(length))
        else:
            _swap_block(block, tok, source, target, length)
    return mapper


def _swap_block(mapper: Any, tokenizer: Any, source: str, target: str, limit: int) -> None:
    prefix, _ = _specials(tokenizer)
    for k in range(prefix):
        mapper[k, k] = 1.0  # start-of-text
    for s, t in zip(_segment_spans(tokenizer, source, 0), _segment_spans(tokenizer, target, 0), strict=True):
        if len(s.tokens) == len(t.tokens):
            for i, j in zip(s.tokens, t.tokens, strict=True):
                mapper[i, j] = 1.0
        else:
            for j in t.tokens:
                mapper[list(s.tokens), j] = 1.0 / len(t.tokens)
    i, j = prefix + len(_encode(tokenizer, source)), prefix + len(_encode(tokenizer, target))
    while i < limit and j < limit:  # end-of-text, then padding, shifted together
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1


def needleman_wunsch(x: list[int], y: list[int], gap: int = 0, match: int = 1,
                     mismatch: int = -1) -> list[int]:
    """Global alignment of ``y`` against ``x``: for each element of ``y``, its index in ``x`` or ``-1``.

    Scores and tie-breaking follow Prompt-to-Prompt's ``seq_aligner`` (gap 0, match 1, mismatch -1; where
    moves tie, a gap in ``x`` wins over a gap in ``y``, which wins over a diagonal step).
    ``needleman_wunsch([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]``
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1: left (y inserted), 2: up (x deleted), 3: diagonal
    for j in range(1, m + 1):
        score[0][j], move[0][j] = j * gap, 1
    for i in range(1, n + 1):
        score[i][0], move[i][0] = i * gap, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i][j - 1] + gap
            up = score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    y_to_x = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            y_to_x[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return y_to_x


def refine_mapper(tokenizer: Any, source: str, target: str) -> tuple[Any, Any]:
    """The refinement mapper: ``(index, alpha)``, both of length L (the token limit).

    ``target_map[..., j] = source_map[..., index[j]]`` where ``alpha[j] == 1`` (a token aligned with the
    source); ``alpha[j] == 0`` marks a token the target added, which keeps its own attention. Token ids
    (start/end included) are aligned with :func:`needleman_wunsch`; padding positions past the target's end
    token map to the same position of the source (as the official ``get_mapper``). Added tokens get
    ``index 0`` (the official code uses ``-1``; either is multiplied by ``alpha = 0``).
    Usage: ``index, alpha = refine_mapper(pipe.tokenizer, "a cake", "a lego cake")``
    """
    import torch

    check_prompt_length(tokenizer, source)
    check_prompt_length(tokenizer, target)
    limit = token_limit(tokenizer)
    index = torch.arange(limit)
    alpha = torch.ones(limit)
    for tok, offset, length in _named_parts(tokenizer):  # each segment aligned on its own
        x, y = list(tok(source).input_ids), list(tok(target).input_ids)
        for j, i in enumerate(needleman_wunsch(x, y)[:length]):
            index[offset + j] = offset + max(i, 0)
            alpha[offset + j] = float(i >= 0)
    return index, alpha


def equalizer(tokenizer: Any, prompt: str, weights: dict[str | int, float]) -> Any:
    """Per-token factors (length L, 1 elsewhere) that scale the attention of the given words of ``prompt``.

    ``weights`` maps a word (every occurrence) or a word index to its factor; negative factors are allowed.
    Usage: ``eq = equalizer(pipe.tokenizer, "a lego cake", {"lego": 2.0})``
    """
    import torch

    eq = torch.ones(token_limit(tokenizer))
    for word, factor in weights.items():
        eq[word_token_indices(tokenizer, prompt, word)] = float(factor)
    return eq
