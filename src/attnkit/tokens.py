"""Words ↔ token positions in a prompt, with the checks users need (unknown word, too-long prompt).

    spans = word_spans(pipe.tokenizer, "a lemon cake")      # [WordSpan("a", [1]), WordSpan("lemon", [2]), ...]
    word_token_indices(pipe.tokenizer, "a lemon cake", "cake")  # [3]

Positions count the start-of-text token as 0, so they index the text encoder's output (and the columns of
cross-attention maps) directly. Words are the prompt's space-separated words, as in Prompt-to-Prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnkit.engine import AttnkitError


@dataclass(frozen=True)
class WordSpan:
    """One space-separated word of a prompt and the token positions it occupies."""

    word: str
    position: int
    tokens: tuple[int, ...]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def token_limit(tokenizer: Any) -> int:
    """How many tokens a prompt may have, start and end tokens included."""
    return int(tokenizer.model_max_length)


def check_prompt_length(tokenizer: Any, prompt: str) -> int:
    """Raise a clear error when ``prompt`` would be truncated; return its token count (with start/end)."""
    count = len(_encode(tokenizer, prompt)) + 2
    limit = token_limit(tokenizer)
    if count > limit:
        raise AttnkitError(
            f"prompt is {count} tokens long but the model reads at most {limit} (start/end included), so its "
            f"end would be silently cut off: shorten it ({prompt!r})"
        )
    return count


def word_spans(tokenizer: Any, prompt: str) -> list[WordSpan]:
    """Token positions of every space-separated word of ``prompt`` (a word may span several tokens)."""
    check_prompt_length(tokenizer, prompt)
    spans = []
    position = 1  # 0 is the start-of-text token
    for i, word in enumerate(prompt.split()):
        n = len(_encode(tokenizer, word))
        spans.append(WordSpan(word, i, tuple(range(position, position + n))))
        position += n
    if position - 1 != len(_encode(tokenizer, prompt)):
        raise AttnkitError(f"the tokenizer splits {prompt!r} differently word by word than as a whole; "
                           "separate punctuation from words with spaces")
    return spans


def token_strings(tokenizer: Any, prompt: str) -> list[str]:
    """The prompt's tokens as strings, start and end tokens included (labels for per-token maps)."""
    ids = tokenizer(prompt).input_ids
    return [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]


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


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    check_prompt_length(tokenizer, prompt)
    return list(tokenizer(prompt).input_ids)  # start and end tokens included, no padding


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
    limit = token_limit(tokenizer)
    mapper = torch.zeros(limit, limit)
    mapper[0, 0] = 1.0  # start-of-text
    for s, t in zip(word_spans(tokenizer, source), word_spans(tokenizer, target), strict=True):
        if len(s.tokens) == len(t.tokens):
            for i, j in zip(s.tokens, t.tokens, strict=True):
                mapper[i, j] = 1.0
        else:
            for j in t.tokens:
                mapper[list(s.tokens), j] = 1.0 / len(t.tokens)
    i, j = len(_prompt_ids(tokenizer, source)) - 1, len(_prompt_ids(tokenizer, target)) - 1
    while i < limit and j < limit:  # end-of-text, then padding, shifted together
        mapper[i, j] = 1.0
        i, j = i + 1, j + 1
    return mapper


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

    x, y = _prompt_ids(tokenizer, source), _prompt_ids(tokenizer, target)
    limit = token_limit(tokenizer)
    aligned = needleman_wunsch(x, y)
    index = torch.arange(limit)
    alpha = torch.ones(limit)
    for j, i in enumerate(aligned):
        index[j] = max(i, 0)
        alpha[j] = float(i >= 0)
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
