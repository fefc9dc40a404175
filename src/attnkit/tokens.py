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
