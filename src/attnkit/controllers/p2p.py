"""Prompt-to-Prompt editing controllers (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention
Control", ICLR 2023): Replace, Refine, Reweight and LocalBlend, plus the paper's step schedules.

    prompts = ["a lemon cake", "a chocolate cake"]
    edit = Replace(prompts, pipe.tokenizer, cross_steps=0.8, self_steps=0.4)
    generate(pipe, prompts, edit, Reweight(prompts, pipe.tokenizer, {"chocolate": 2.0}), seed=8888)

The batch holds one row per prompt, the source (prompt 0) first; every controller edits only the target rows
of the conditional half (the unconditional half of a guidance batch is left alone, as in the official code).
Where an edit is a pure copy of the source's map (self-attention replacement; a word swap whose mapper is the
identity while every column is replaced) the target rows take the source's queries and keys and attention
stays fused (SDPA); probabilities are materialised only where maps must be mixed or re-weighted.

Controllers compose in the order given to :func:`attnkit.control`: a :class:`Reweight` placed after a
:class:`Replace`/:class:`Refine` with the same ``cross_steps`` scales the replaced map, which reproduces the
official chained ``AttentionReweight`` exactly (see :class:`Reweight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.controllers.word_maps import WordMapSums
from attnkit.engine import AttentionCall, AttnkitError, Control, Controller
from attnkit.tokens import (
    check_prompt_length,
    equalizer,
    refine_mapper,
    swap_mapper,
    token_limit,
    word_spans,
    word_token_indices,
)

Window = float | tuple[float, float]
CrossSchedule = float | tuple[float, float] | dict[str, Window]
DEFAULT_KEYS = ("default_", "default")


# -- schedules --------------------------------------------------------------------------------------------
def _window(value: Any, what: str) -> tuple[float, float]:
    if isinstance(value, bool) or not isinstance(value, (int, float, tuple, list)):
        raise AttnkitError(f"{what} must be a fraction like 0.8 or a (start, end) pair, got {value!r}")
    start, end = (0.0, float(value)) if isinstance(value, (int, float)) else tuple(map(float, value))
    if not 0.0 <= start <= end <= 1.0:
        raise AttnkitError(f"{what} = {value!r}: fractions must satisfy 0 <= start <= end <= 1")
    return start, end


def self_window(schedule: Window, num_steps: int) -> tuple[int, int]:
    """Steps ``[int(N·start), int(N·end))`` of self-attention replacement; a float ``s`` means ``(0, s)``.

    ``self_window(0.4, 50) == (0, 20)``
    """
    start, end = _window(schedule, "self_steps")
    return int(num_steps * start), int(num_steps * end)


def cross_alpha(tokenizer: Any, targets: Sequence[str], schedule: CrossSchedule, num_steps: int) -> torch.Tensor:
    """Per step, target and target token: 1 where the target's cross-attention column is replaced, else 0.

    Shape ``(num_steps, len(targets), L)``. A window ``(start, end)`` covers steps
    ``[int(start·(N+1)), int(end·(N+1)))`` (the official ``get_time_words_attention_alpha``, which builds
    ``N + 1`` rows); a float ``c`` means ``(0, c)``. A dict ``{"default_": c, "word": c_word}`` gives the
    columns of ``word`` (in each target that contains it) their own window; without ``"default_"`` the
    default is ``(0, 1)``. Usage: ``cross_alpha(tok, ["a beet cake"], {"default_": .8, "beet": .4}, 50)``
    """
    rows = num_steps + 1
    limit = token_limit(tokenizer)
    alpha = torch.zeros(rows, len(targets), limit)

    def fill(window: Window, target: int, columns: Any) -> None:
        start, end = _window(window, "cross_steps")
        alpha[:, target, columns] = 0.0
        alpha[int(start * rows): int(end * rows), target, columns] = 1.0

    per_word = dict(schedule) if isinstance(schedule, dict) else {"default_": schedule}
    default = next((per_word.pop(k) for k in DEFAULT_KEYS if k in per_word), (0.0, 1.0))
    for t in range(len(targets)):
        fill(default, t, slice(None))
    for word, window in per_word.items():
        found = False
        for t, prompt in enumerate(targets):
            if word.lower() in (s.word.lower() for s in word_spans(tokenizer, prompt)):
                fill(window, t, word_token_indices(tokenizer, prompt, word))
                found = True
        if not found:
            raise AttnkitError(f"cross_steps names {word!r}, which is not a word of any target prompt "
                               f"({', '.join(map(repr, targets))})")
    return alpha[:num_steps]


def _check_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if len(prompts) < 2:
        raise AttnkitError("Prompt-to-Prompt needs a source prompt and at least one target prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise AttnkitError(f"prompts must be non-empty strings, got {p!r}")
        check_prompt_length(tokenizer, p)
    return prompts


def _resolve_self_res(self_res: int | float, latent_hw: tuple[int, int]) -> float:
    """The side of the largest square query grid that self-replacement touches: an int is a side in attention
    pixels (the paper's 16 → grids of up to 16x16 = 256 pixels), a float in (0, 1) a fraction of the latent
    side."""
    if isinstance(self_res, float) and 0 < self_res < 1:
        return self_res * max(latent_hw)
    return float(self_res)


def self_replaced(height: int, width: int, self_res: int | float, latent_hw: tuple[int, int]) -> bool:
    """Whether self-attention replacement touches a ``height x width`` query grid: when it has at most
    ``self_res²`` query pixels, the official code's test (``attn.shape[2] <= 16 ** 2``). On square grids that is
    "side <= self_res"; on others it counts pixels, so a 20x12 grid (240) is replaced at 16 and a 17x16 one
    (272) is not. ``self_replaced(20, 12, 16, (64, 64))  # True``"""
    limit = _resolve_self_res(self_res, latent_hw)
    return height * width <= limit * limit


# -- word swap and refinement -------------------------------------------------------------------------------
class _AttentionEdit(Controller):
    """Shared machinery of Replace and Refine: schedules, row bookkeeping, self-attention replacement."""

    def __init__(self, prompts: Sequence[str], tokenizer: Any, cross_steps: CrossSchedule = 0.8,
                 self_steps: Window = 0.4, self_res: int | float = 16) -> None:
        self.tokenizer = tokenizer
        self.prompts = _check_prompts(tokenizer, prompts)
        self.targets = self.prompts[1:]
        self.cross_steps = cross_steps
        self.self_steps = self_steps
        self.self_res = self_res
        _window(self_steps, "self_steps")
        cross_alpha(tokenizer, self.targets, cross_steps, 1)  # validate the schedule (words, ranges) now
        self._alpha: dict[int, torch.Tensor] = {}
        self._ctl: Control | None = None

    def on_enter(self, ctl: Control) -> None:
        self._ctl = ctl  # for the latent size (self_res given as a fraction)

    # schedules are built once per number of steps
    def alpha(self, num_steps: int) -> torch.Tensor:
        if num_steps not in self._alpha:
            self._alpha[num_steps] = cross_alpha(self.tokenizer, self.targets, self.cross_steps, num_steps)
        return self._alpha[num_steps]

    def _rows(self, call: AttentionCall) -> int:
        if call.layout.prompts != len(self.prompts):
            raise AttnkitError(f"the batch has {call.layout.prompts} prompts but this edit was built for "
                               f"{len(self.prompts)} ({self.prompts}); generate exactly [source, *targets], "
                               "one image per prompt")
        return call.layout.cond_rows.start

    def _self_active(self, call: AttentionCall) -> bool:
        start, end = self_window(self.self_steps, call.num_steps)
        if not start <= call.step < end:
            return False
        return self_replaced(call.height, call.width, self.self_res, self._ctl.state.latent_hw)

    # per target: "copy" (the source's map, fused), "mix" (explicit probabilities) or None (untouched)
    def _cross_plan(self, call: AttentionCall) -> list[str | None]:
        alpha = self.alpha(call.num_steps)[call.step]
        plan: list[str | None] = []
        for t in range(len(self.targets)):
            a = alpha[t]
            if not bool(a.any()):
                plan.append(None)
            elif bool(a.all()) and self._is_copy(t):
                plan.append("copy")
            else:
                plan.append("mix")
        return plan

    def _is_copy(self, target: int) -> bool:
        raise NotImplementedError

    def _plan(self, call: AttentionCall) -> list[str | None]:
        if call.is_cross:
            self._check_keys(call)
            return self._cross_plan(call)
        return ["copy" if self._self_active(call) else None] * len(self.targets)

    def _check_keys(self, call: AttentionCall) -> None:
        if call.key.shape[-2] != token_limit(self.tokenizer):
            raise AttnkitError(f"cross-attention has {call.key.shape[-2]} keys but the tokenizer pads to "
                               f"{token_limit(self.tokenizer)}; build the edit with the pipeline's own tokenizer")

    def edit_qkv(self, call: AttentionCall) -> None:
        base = self._rows(call)
        copies = [base + 1 + t for t, p in enumerate(self._plan(call)) if p == "copy"]
        if not copies:
            return
        rows = torch.tensor(copies, device=call.query.device)
        # The source's queries and keys give every copying target row the source's map; values stay the
        # target's own. SDPA still runs: no probabilities are materialised for a pure copy.
        call.query = call.query.index_copy(0, rows, call.query[base:base + 1].expand(len(copies), -1, -1, -1))
        call.key = call.key.index_copy(0, rows, call.key[base:base + 1].expand(len(copies), -1, -1, -1))

    def wants_probs(self, call: AttentionCall) -> bool:
        return call.is_cross and "mix" in self._plan(call)

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        base = self._rows(call)
        alpha = self.alpha(call.num_steps)[call.step].to(probs)
        source = probs[base]
        out = probs.clone()
        for t, p in enumerate(self._plan(call)):
            if p != "mix":
                continue
            row = base + 1 + t
            a = alpha[t]
            out[row] = a * self._replaced(t, source, probs[row]) + (1 - a) * probs[row]
        return out

    def _replaced(self, target: int, source: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """The target's map built from the source's ``(heads, queries, keys)`` map (before the schedule)."""
        raise NotImplementedError


class Replace(_AttentionEdit):
    """Word swap (Prompt-to-Prompt ``AttentionReplace``): targets take the source's attention through a mapper.

    Usage::

        prompts = ["a lemon cake", "a chocolate cake", "a lego cake"]
        with control(pipe, Replace(prompts, pipe.tokenizer, cross_steps=0.8, self_steps=0.4)) as ctl: ...

    Cross-attention of target ``i`` at step ``t``: ``α_t ⊙ (M_src @ mapper_i) + (1 − α_t) ⊙ M_i`` with
    ``α_t`` per target token from ``cross_steps`` (see :func:`cross_alpha`); self-attention: the source's map
    on layers with at most ``self_res²`` query pixels (paper: 16, i.e. ≤ 256 pixels, see :func:`self_replaced`;
    a float in (0, 1) is a fraction of the latent side — SDXL at 1024 px needs ``32`` or ``0.25`` to replace
    anything; real-image edits default to 32, the null-text notebook's) during
    ``self_steps`` (see :func:`self_window`). Every target needs the source's word count; swapped words may
    have different token counts (:func:`attnkit.tokens.swap_mapper`, which documents how the tail of the
    mapper differs from the official code).
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Any, cross_steps: CrossSchedule = 0.8,
                 self_steps: Window = 0.4, self_res: int | float = 16) -> None:
        super().__init__(prompts, tokenizer, cross_steps, self_steps, self_res)
        self.mappers = torch.stack([swap_mapper(tokenizer, self.prompts[0], t) for t in self.targets])
        eye = torch.eye(self.mappers.shape[-1])
        self._identity = [bool(torch.equal(m, eye)) for m in self.mappers]

    def _is_copy(self, target: int) -> bool:
        return self._identity[target]

    def _replaced(self, target: int, source: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        return source @ self.mappers[target].to(source)


class Refine(_AttentionEdit):
    """Refinement (Prompt-to-Prompt ``AttentionRefine``): words added to or removed from the source prompt.

    Usage: ``Refine(["a cake", "a lego cake"], pipe.tokenizer, cross_steps=0.8, self_steps=0.4)``

    Tokens are aligned by Needleman–Wunsch (:func:`attnkit.tokens.refine_mapper`). Cross-attention of
    target ``i``: ``α_t ⊙ (M_src[..., index_i] ⊙ a_i + M_i ⊙ (1 − a_i)) + (1 − α_t) ⊙ M_i`` with ``a_i = 0``
    on added tokens; self-attention as :class:`Replace`.
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Any, cross_steps: CrossSchedule = 0.8,
                 self_steps: Window = 0.4, self_res: int | float = 16) -> None:
        super().__init__(prompts, tokenizer, cross_steps, self_steps, self_res)
        pairs = [refine_mapper(tokenizer, self.prompts[0], t) for t in self.targets]
        self.index = torch.stack([p[0] for p in pairs])
        self.aligned = torch.stack([p[1] for p in pairs])
        limit = self.index.shape[-1]
        self._identity = [bool(torch.equal(i, torch.arange(limit)) and a.all()) for i, a in pairs]

    def _is_copy(self, target: int) -> bool:
        return self._identity[target]

    def _replaced(self, target: int, source: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        a = self.aligned[target].to(source)
        return source[..., self.index[target].to(source.device)] * a + own * (1 - a)


# -- re-weighting --------------------------------------------------------------------------------------------
class Reweight(Controller):
    """Scale the cross-attention of chosen words in the target rows (Prompt-to-Prompt ``AttentionReweight``).

    Usage::

        prompts = ["a lemon cake", "a lego cake"]
        control(pipe, Replace(prompts, tok), Reweight(prompts, tok, {"lego": 2.0}))

    In target ``i``'s columns of the words in ``weights`` (those words it contains), at steps where
    ``cross_steps`` covers the column: ``M ← M ⊙ w`` (no renormalisation; negative factors allowed), applied
    to the map as edited by the controllers before this one. Placed after a Replace/Refine with the same
    ``cross_steps``, this is the official chained re-weighting ``α ⊙ (replaced ⊙ w) + (1 − α) ⊙ own``
    exactly: where the column is replaced the replaced map is scaled, elsewhere the target's own map is kept.
    Alone, it scales the target's own map. A word missing from every target is an error.
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Any, weights: dict[str, float],
                 cross_steps: CrossSchedule = 0.8) -> None:
        self.tokenizer = tokenizer
        self.prompts = _check_prompts(tokenizer, prompts)
        self.targets = self.prompts[1:]
        if not weights:
            raise AttnkitError("Reweight needs at least one word and its factor, e.g. {'lego': 2.0}")
        self.weights = {str(w): float(f) for w, f in weights.items()}
        eqs = []
        for word in self.weights:
            if not any(_has_word(tokenizer, t, word) for t in self.targets):
                raise AttnkitError(f"cannot re-weight {word!r}: it is not a word of any target prompt "
                                   f"({', '.join(map(repr, self.targets))})")
        for t in self.targets:
            eqs.append(equalizer(tokenizer, t, {w: f for w, f in self.weights.items() if _has_word(tokenizer, t, w)}))
        self.factors = torch.stack(eqs)
        self.cross_steps = cross_steps
        cross_alpha(tokenizer, self.targets, cross_steps, 1)
        self._alpha: dict[int, torch.Tensor] = {}

    def _scale(self, call: AttentionCall) -> torch.Tensor | None:
        """Per target and token, the factor applied at this call (``1 + α (w − 1)``), or None if all ones."""
        if not call.is_cross:
            return None
        if call.num_steps not in self._alpha:
            self._alpha[call.num_steps] = cross_alpha(self.tokenizer, self.targets, self.cross_steps,
                                                      call.num_steps)
        alpha = self._alpha[call.num_steps][call.step]
        scale = 1 + alpha * (self.factors - 1)
        return None if bool((scale == 1).all()) else scale

    def wants_probs(self, call: AttentionCall) -> bool:
        return self._scale(call) is not None

    def edit_probs(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor:
        if call.layout.prompts != len(self.prompts):
            raise AttnkitError(f"the batch has {call.layout.prompts} prompts but Reweight was built for "
                               f"{len(self.prompts)}; generate exactly [source, *targets]")
        scale = self._scale(call).to(probs)
        if scale.shape[-1] != probs.shape[-1]:
            raise AttnkitError(f"cross-attention has {probs.shape[-1]} keys but the tokenizer pads to "
                               f"{scale.shape[-1]}; build Reweight with the pipeline's own tokenizer")
        base = call.layout.cond_rows.start
        out = probs.clone()
        rows = slice(base + 1, base + len(self.prompts))
        out[rows] = probs[rows] * scale[:, None, None, :]
        return out


def _has_word(tokenizer: Any, prompt: str, word: str | int) -> bool:
    spans = word_spans(tokenizer, prompt)
    if isinstance(word, int):  # a word index picks one occurrence
        return 0 <= word < len(spans)
    return word.strip().lower() in (s.word.lower() for s in spans)


# -- local blending ----------------------------------------------------------------------------------------
class LocalBlend(Controller):
    """Keep everything outside the edited words' region: after each step, ``x_i ← x_src + m_i ⊙ (x_i − x_src)``.

    Usage: ``LocalBlend(["a lemon cake", "a lego cake"], pipe.tokenizer, ["cake"], threshold=0.3)``

    The mask of target ``i`` is the union of the source's and the target's word masks. A word mask: the
    cross-attention maps of the conditional rows at one grid resolution, summed over the words' tokens,
    averaged over layers and heads and summed over the steps so far; max-pooled 3x3 (stride 1), resized
    (nearest) to the latent grid, divided by its maximum and thresholded at ``threshold``. ``subtract`` words
    (null-text inversion notebook) remove their own (unpooled) mask, thresholded at ``subtract_threshold``.
    Blending starts at step ``int(start · N)``.

    ``words`` is one list for all prompts (each word used where the prompt has it) or one list per prompt. A word
    is a string (every occurrence of it) or an int, the index of one word of the prompt (0 = first), to pick
    one of two "circle"s.
    ``res`` picks the attention grid (side length); ``None`` takes the largest cross-attention grid of at most
    ``max(16, latent side / 4)`` (16x16 for SD at 512 px, as the paper; 32x32 for SDXL at 1024 px; 16x16 for
    the bundled model), so no layer indices are tied to one model. Differences from the official code
    (deliberate): it reads hard-coded layer indices of SD1.x at 512 px and, with more than one target, fails to
    broadcast its mask; here each target has its own mask. Place it after the editing controllers so it reads the edited maps (as the official
    store does, by sharing the tensors it edits in place).
    """

    def __init__(self, prompts: Sequence[str], tokenizer: Any, words: Sequence[str] | Sequence[Sequence[str]],
                 threshold: float = 0.3, start: float = 0.0, subtract: Sequence[str] | None = None,
                 subtract_threshold: float = 0.3, res: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.prompts = _check_prompts(tokenizer, prompts)
        self.threshold, self.subtract_threshold = float(threshold), float(subtract_threshold)
        self.start = float(start)
        if not 0.0 <= self.start <= 1.0:
            raise AttnkitError(f"start = {start!r}: use a fraction of the steps in [0, 1]")
        self.res = res
        self.add_tokens = self._tokens(words, "blend")
        self.sub_tokens = self._tokens(subtract, "subtract") if subtract else None
        self.words, self.subtract = words, subtract

    def _tokens(self, words: Any, what: str) -> list[list[int]]:
        if isinstance(words, str):
            words = [words]
        words = list(words or [])
        if not words:
            raise AttnkitError(f"LocalBlend needs at least one {what} word")
        per_prompt = all(isinstance(w, (list, tuple)) for w in words)
        if per_prompt and len(words) != len(self.prompts):
            raise AttnkitError(f"{what} words given per prompt need one list per prompt ({len(self.prompts)}), "
                               f"got {len(words)}")
        lists = [list(w) for w in words] if per_prompt else [words] * len(self.prompts)
        tokens: list[list[int]] = [[] for _ in self.prompts]
        for word in dict.fromkeys(w for ws in lists for w in ws):
            hits = [i for i, (p, ws) in enumerate(zip(self.prompts, lists, strict=True))
                    if word in ws and _has_word(self.tokenizer, p, word)]
            if not hits:
                raise AttnkitError(f"{what} word {word!r} is in none of the prompts "
                                   f"({', '.join(map(repr, self.prompts))}); name a word of the source or a target")
            for i in hits:
                tokens[i] += word_token_indices(self.tokenizer, self.prompts[i], word)
        return tokens

    def on_enter(self, ctl: Control) -> None:
        self._ctl = ctl
        token_sets = [self.add_tokens] + ([self.sub_tokens] if self.sub_tokens is not None else [])
        self.sums = WordMapSums(token_sets, self.res, "LocalBlend")  # [source, *targets]: one mask each
        self.last_mask: torch.Tensor | None = None

    def observe(self, call: AttentionCall) -> None:
        self.sums.observe(call)

    def mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The current blend masks ``(prompts, 1, h, w)``: row ``i`` is the mask applied to target ``i``."""
        (add, *sub), count = self.sums.get()
        mask = _word_mask(add / count, latent_hw, self.threshold, pool=True)
        mask = mask[:1] | mask
        if sub:
            (sub,) = sub
            drop = _word_mask(sub / count, latent_hw, self.subtract_threshold, pool=False)
            mask = mask & ~(drop[:1] | drop)
        return mask

    def on_step_end(self, ctl: Control, step: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents = tensors["latents"]
        hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        self.sums.choose(hw)
        mask = self.mask(hw)
        self.last_mask = mask  # the region each target may change: what a final pixel paste-back keeps
        if step < int(self.start * ctl.num_steps):
            return {}
        mask = mask.to(latents.dtype)
        source = latents[:1]
        blended = source + mask[1:] * (latents[1:] - source)
        return {"latents": torch.cat([source, blended])}


def _word_mask(maps: torch.Tensor, size: tuple[int, int], threshold: float, pool: bool) -> torch.Tensor:
    if pool:
        maps = F.max_pool2d(maps, kernel_size=3, stride=1, padding=1)
    maps = F.interpolate(maps, size=size)  # nearest, as the official code
    peak = maps.amax(dim=(2, 3), keepdim=True)
    # a prompt without any of the words has an all-zero map: no mask (the official code divides 0 by 0)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), 0.0) > threshold
