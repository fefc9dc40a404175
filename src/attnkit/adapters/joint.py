"""Joint text-image attention (MM-DiT: SD3/SD3.5, FLUX) as the two views controllers know.

One joint layer attends over ``[text; image]`` (FLUX) or ``[image; text]`` (SD3) with one softmax. The engine
offers it to the controllers as two :class:`~attnkit.engine.AttentionCall` views, so a controller written for a
UNet needs no branch for the model family:

- ``"self"``: image queries × image keys/values;
- ``"cross"``: the same image queries × text keys/values.

Reading: ``call.probs()`` of a view is ``softmax(q kᵀ · scale)`` over that view's keys, i.e. the layer's joint
block renormalised over the view's columns (the image × text block divided by each row's text mass). That is
what a cross-attention map means on a UNet: a distribution over the text tokens per pixel.

Editing:

- q/k/v: the self view is edited first, then the cross view starts from the self view's edited queries (both
  views share the image queries); keys and values of a view are that view's tokens. The joint attention then
  runs on the reassembled sequence, fused (the model's own backend) unless probabilities were edited.
  Replaced keys/values (same count) are the layer's keys and values, seen by every query, text queries
  included. Keys a controller *adds* to a view (more than the view had) and view masks apply to the image
  queries only: text queries keep attending to the layer's own tokens.
- probabilities: an edited view map (rows renormalised as above) goes back into the joint softmax scaled by
  that row's own mass on the view's columns, so an edit that keeps a row's sum keeps the joint row a
  distribution; the other block keeps its joint probabilities. Text-query rows are never edited.

Extra text-stream tokens (:meth:`~attnkit.engine.Controller.extra_text_tokens`, ConceptAttention's concepts)
enter at the model's ``context_embedder`` (:func:`add_text_tokens`), are split off the text stream's q/k/v in
every double-stream layer (:func:`split_extra`), attend to ``[themselves; image]`` beside the joint attention and
rejoin the text stream's output; FLUX's single-stream blocks never see them. Every view's attention output
reaches :meth:`~attnkit.engine.Controller.observe_output`.

Text-query outputs (FLUX's double-stream ``text_out``, the text part of SD3's joint output and of FLUX's
single-stream output) are computed exactly as the stock processor computes them whenever no controller
changed keys or values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attnkit.engine import (
    AttentionCall,
    AttnkitError,
    Control,
    ExtraTokens,
    LayerInfo,
    Positions,
    TokenLayout,
    run_probability_hooks,
)

# Largest block of explicit probabilities materialised at once (bytes), as the store's chunking.
CHUNK_BYTES = 64 * 2**20
Fused = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Views:
    """The views of one attention module: ``self`` always, ``cross`` where the layer has text tokens."""

    self: LayerInfo
    cross: LayerInfo | None = None


def join(tokens: TokenLayout, text: torch.Tensor | None, image: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """``[text; image]`` or ``[image; text]`` along ``dim``, in the model's own token order."""
    if text is None:
        return image
    return torch.cat([text, image] if tokens.text_first else [image, text], dim=dim)


def attend_joint(ctl: Control, views: Views, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 tokens: TokenLayout, fused: Fused, mask: torch.Tensor | None = None,
                 extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 positions: Positions | None = None) -> torch.Tensor:
    """The joint attention of one layer under the controllers. ``query/key/value``: ``(B, H, S, d)`` in the
    model's token order; ``fused(q, k, v, mask)`` is the stock computation; returns ``(B, H, S, d)``.

    ``extra``: the extra text-stream tokens' ``(q, k, v)`` (:meth:`~attnkit.engine.Controller.extra_text_tokens`),
    kept out of the joint sequence: they attend to ``[themselves; the layer's own image tokens]`` in a separate
    softmax, so no other token sees them, and their output comes back right after the text tokens (where the
    block's text stream carries them): ``(B, H, S + n, d)``. Controllers then see every view's output
    (:meth:`~attnkit.engine.Controller.observe_output`). ``positions``: how the image queries and keys carry
    token positions (FLUX's RoPE), offered to the controllers as ``call.positions``."""
    out, calls = _attend_views(ctl, views, query, key, value, tokens, fused, mask, positions)
    image_out = out[:, :, tokens.image]
    extra_tokens = None
    if extra is not None:
        q_x, k_x, v_x = extra
        k_img, v_img = key[:, :, tokens.image], value[:, :, tokens.image]
        out_x = fused(q_x, torch.cat([k_x, k_img], dim=2), torch.cat([v_x, v_img], dim=2), None)
        extra_tokens = ExtraTokens(query=q_x, key=k_x, value=v_x, output=out_x)
        stop = tokens.text.stop
        out = torch.cat([out[:, :, :stop], out_x, out[:, :, stop:]], dim=2)
    for call in calls:
        call.output, call.extra = image_out, extra_tokens
        for c in ctl.controllers:
            c.observe_output(call)
    return out


def _attend_views(ctl: Control, views: Views, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  tokens: TokenLayout, fused: Fused, mask: torch.Tensor | None,
                  positions: Positions | None = None) -> tuple[torch.Tensor, list[AttentionCall]]:
    """:func:`attend_joint` without extra tokens: the joint output and the views offered to the controllers."""
    state = ctl.state
    if not ctl.controllers or state.passthrough:
        return fused(query, key, value, mask), []
    if state.layout is None:
        raise AttnkitError("attention ran before the transformer step hook; call the transformer, not its "
                           "layers directly")
    if mask is not None:
        raise AttnkitError("this joint attention layer got an attention mask, which attnkit does not split into "
                           "text and image blocks; run without attention masks under attnkit.control")
    height, width = image_grid(state.grid, tokens.image_tokens)
    img, txt = tokens.image, tokens.text
    scale = 1.0 / math.sqrt(query.shape[-1])
    common = dict(height=height, width=width, step=state.step, num_steps=state.num_steps, layout=state.layout,
                  scale=scale, tokens=tokens, positions=positions)
    q_img, k_img, v_img = query[:, :, img], key[:, :, img], value[:, :, img]
    self_call = AttentionCall(views.self, query=q_img, key=k_img, value=v_img, **common)
    cross_call = None
    if views.cross is not None and tokens.text_tokens:
        k_txt, v_txt = key[:, :, txt], value[:, :, txt]
        cross_call = AttentionCall(views.cross, query=q_img, key=k_txt, value=v_txt, **common)

    for c in ctl.controllers:
        c.edit_qkv(self_call)
    if cross_call is not None:
        cross_call.query = self_call.query  # one set of image queries serves both blocks
        for c in ctl.controllers:
            c.edit_qkv(cross_call)
        self_call.query = cross_call.query
    calls = [self_call] if cross_call is None else [self_call, cross_call]
    before_s = run_probability_hooks(ctl, self_call)
    before_c = run_probability_hooks(ctl, cross_call) if cross_call is not None else None

    untouched = (self_call.query is q_img and self_call.key is k_img and self_call.value is v_img
                 and (cross_call is None or (cross_call.key is k_txt and cross_call.value is v_txt)))
    edited = self_call.edited is not None or (cross_call is not None and cross_call.edited is not None)
    masked = self_call.mask is not None or (cross_call is not None and cross_call.mask is not None)
    if untouched and not edited and not masked:
        return fused(query, key, value, None), calls  # exactly the stock computation

    n_txt, n_img = tokens.text_tokens, tokens.image_tokens
    k_c = v_c = None
    if cross_call is not None:
        k_c, v_c = cross_call.key, cross_call.value
    elif n_txt:  # a layer with text tokens but no cross view: its text keys are untouched
        k_c, v_c = key[:, :, txt], value[:, :, txt]
    same_count = self_call.key.shape[-2] == n_img and (k_c is None or k_c.shape[-2] == n_txt)
    if not masked and same_count:
        # One fused call over the reassembled sequence (the stock kernel), then the edited blocks' difference
        # on the image rows.
        q = query if self_call.query is q_img else join(tokens, query[:, :, txt], self_call.query)
        k = key if untouched else join(tokens, k_c, self_call.key)
        v = value if untouched else join(tokens, v_c, self_call.value)
        out = fused(q, k, v, None)
        if not edited:
            return out, calls
        out_img = out[:, :, img] + _edit_difference(self_call, cross_call, k_c, v_c, before_s, before_c)
        return join(tokens, out[:, :, txt] if n_txt else None, out_img), calls

    # Text rows and image rows apart: text queries attend to the layer's own token count only, without masks.
    q = self_call.query
    keys = self_call.key if k_c is None else torch.cat([k_c, self_call.key], dim=2)
    values = self_call.value if v_c is None else torch.cat([v_c, self_call.value], dim=2)
    mask = _joined_mask(q, None if cross_call is None else cross_call.mask, k_c, self_call.mask, self_call.key)
    out_img = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    if edited:
        out_img = out_img + _edit_difference(self_call, cross_call, k_c, v_c, before_s, before_c)
    out_txt = None
    if n_txt:
        k_own = join(tokens, None if k_c is None else k_c[:, :, :n_txt], self_call.key[:, :, :n_img])
        v_own = join(tokens, None if v_c is None else v_c[:, :, :n_txt], self_call.value[:, :, :n_img])
        out_txt = fused(query[:, :, txt], k_own, v_own, None)
    return join(tokens, out_txt, out_img), calls


def _edit_difference(self_call: AttentionCall, cross_call: AttentionCall | None, k_c: torch.Tensor | None,
                     v_c: torch.Tensor | None, before_s: torch.Tensor | None,
                     before_c: torch.Tensor | None) -> torch.Tensor:
    """What the edited view maps change in the image rows' output: ``m · (edited − own) @ v`` per view, with
    ``m`` the row's joint mass on the view's columns (``sigmoid(lse_text − lse_image)`` for the text block).
    Added to the fused output this is the joint softmax with the edited blocks put back at their own mass, but
    no (image × all keys) probabilities are materialised except an edited view's own."""
    q, scale = self_call.query, self_call.scale
    lse_s = _view_logsumexp(q, self_call.key, scale, self_call.mask, before_s)
    if k_c is None:
        mass_c = torch.zeros_like(lse_s)
    else:
        lse_c = _view_logsumexp(q, k_c, scale, None if cross_call is None else cross_call.mask, before_c)
        mass_c = torch.sigmoid(lse_c - lse_s)
    mass_c = mass_c.unsqueeze(-1)
    delta = torch.zeros(*q.shape[:-1], self_call.value.shape[-1], dtype=q.dtype, device=q.device)
    if cross_call is not None and cross_call.edited is not None:
        own = before_c if before_c is not None else _probs(q, k_c, scale, cross_call.mask)
        delta = delta + mass_c * torch.matmul(cross_call.edited - own, v_c)
    if self_call.edited is not None:
        own = before_s if before_s is not None else _probs(q, self_call.key, scale, self_call.mask)
        delta = delta + (1 - mass_c) * torch.matmul(self_call.edited - own, self_call.value)
    return delta


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return (scores if mask is None else scores + mask).softmax(dim=-1)


def _view_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None,
                    probs: torch.Tensor | None) -> torch.Tensor:
    """``logsumexp`` of a view's logits, ``(B, H, queries)``. Where the view's own map was materialised anyway
    (``probs``, float32/64) it follows from one logit per row: ``lse = s_ij − log p_ij`` at the row's largest
    ``p_ij`` (at least 1/keys, so its log is well conditioned): a dot product per row instead of the whole
    block of logits again."""
    if probs is None or probs.dtype not in (torch.float32, torch.float64):
        return _logsumexp(q, k, scale, mask)
    top, index = probs.max(dim=-1)  # (B, H, Q)
    k_top = torch.gather(k.expand(*probs.shape[:2], *k.shape[2:]), 2,
                         index.unsqueeze(-1).expand(*index.shape, k.shape[-1]))
    logit = (q * k_top).sum(-1) * scale
    if mask is not None:
        full = mask.expand(*probs.shape[:2], q.shape[2], mask.shape[-1])
        logit = logit + torch.gather(full, 3, index.unsqueeze(-1)).squeeze(-1)
    return logit - torch.log(top)


def _logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """``logsumexp`` over the keys of ``q kᵀ · scale (+ mask)``, ``(B, H, queries)``, a block of query rows at a
    time (the image × image logits of a 1024 px FLUX layer are gigabytes whole)."""
    block = max(1, CHUNK_BYTES // max(1, q.shape[0] * q.shape[1] * k.shape[-2] * q.element_size()))
    parts = []
    for start in range(0, q.shape[2], block):
        rows = slice(start, start + block)
        scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + _query_rows(mask, rows)
        parts.append(torch.logsumexp(scores.float(), dim=-1).to(q.dtype))
    return torch.cat(parts, dim=-1)


def _query_rows(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    """The rows of an additive mask for a block of queries (a mask without a query axis applies to all)."""
    return mask[..., rows, :] if mask.shape[-2] > 1 else mask


def _joined_mask(q: torch.Tensor, mask_c: torch.Tensor | None, k_c: torch.Tensor | None,
                 mask_s: torch.Tensor | None, k_s: torch.Tensor) -> torch.Tensor | None:
    if mask_c is None and mask_s is None:
        return None
    batch, heads, queries = q.shape[0], q.shape[1], q.shape[2]
    parts = []
    for mask, keys in ((mask_c, k_c), (mask_s, k_s)):
        if keys is None:
            continue
        if mask is None:
            mask = torch.zeros(1, 1, 1, keys.shape[-2], dtype=q.dtype, device=q.device)
        parts.append(mask.to(q.dtype))
    rows = max(p.shape[0] for p in parts)
    head_count = heads if any(p.shape[1] == heads and heads != 1 for p in parts) else 1
    parts = [p.expand(rows if p.shape[0] == 1 else p.shape[0], head_count if p.shape[1] == 1 else p.shape[1],
                      queries, p.shape[-1]) for p in parts]
    if rows not in (1, batch):
        raise AttnkitError(f"a controller's attention mask has {rows} rows for a batch of {batch}")
    return torch.cat(parts, dim=-1)


def add_text_tokens(model: Any, tokens: torch.Tensor, strip_before: Any = None) -> list[Any]:
    """Hooks that make ``tokens`` ``(n, dim)`` ride the text stream of a joint model (see
    :meth:`~attnkit.engine.Controller.extra_text_tokens`): appended to the prompt embeddings where the model's
    ``context_embedder`` projects them (so they get the text input projection), and cut off again where
    ``strip_before`` (FLUX's first single-stream block) receives the text stream. Returns the hook handles."""
    embedder = model.context_embedder
    width = getattr(embedder, "in_features", None)
    if width is not None and tokens.shape[-1] != width:
        raise AttnkitError(f"extra text-stream tokens have {tokens.shape[-1]} channels, the model's prompt "
                           f"embeddings {width}: embed them with the pipeline's own text encoder")
    count = int(tokens.shape[0])

    def append(module: Any, args: tuple) -> tuple:
        x = args[0]
        extra = tokens.to(device=x.device, dtype=x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x, extra], dim=1), *args[1:])

    def strip(module: Any, args: tuple, kwargs: dict) -> tuple:
        if "encoder_hidden_states" in kwargs:
            kwargs = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:, :-count]}
        elif len(args) > 1:
            args = (args[0], args[1][:, :-count], *args[2:])
        return args, kwargs

    handles = [embedder.register_forward_pre_hook(append)]
    if strip_before is not None:
        handles.append(strip_before.register_forward_pre_hook(strip, with_kwargs=True))
    return handles


@contextmanager
def bypass_block(block: Any) -> Iterator[None]:
    """Inside the block, the MM-DiT transformer block ``block`` returns its input unchanged (its output is
    ``(encoder_hidden_states, hidden_states)`` as it received them, the convention of SD3's and FLUX's double-
    and single-stream blocks), through a forward hook that is removed on exit, also after an exception."""

    def identity(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        names = ("hidden_states", "encoder_hidden_states")
        given = dict(zip(names, args, strict=False))
        given.update({k: kwargs[k] for k in names if k in kwargs})
        if "hidden_states" not in given:
            raise AttnkitError(f"cannot bypass {type(module).__name__}: it was called without hidden_states")
        return given.get("encoder_hidden_states"), given["hidden_states"]

    handle = block.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def split_extra(ctl: Control, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dim: int
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """The text-stream ``query/key/value`` of a double-stream layer without the extra tokens (the last
    ``ctl.state.extra_tokens`` along ``dim``), and the extra tokens' own as ``(B, H, n, d)`` (None: no extras)."""
    n = ctl.state.extra_tokens
    if not n:
        return (query, key, value), None
    own = tuple(t.narrow(dim, 0, t.shape[dim] - n) for t in (query, key, value))
    extra = tuple(t.narrow(dim, t.shape[dim] - n, n) for t in (query, key, value))
    if dim == 1:  # (B, S, H, d) → (B, H, S, d)
        extra = tuple(t.transpose(1, 2) for t in extra)
    return own, extra  # type: ignore[return-value]


def image_grid(grid: tuple[int, int] | None, image_tokens: int) -> tuple[int, int]:
    """The image-token grid ``(h, w)`` of this call; a clear error where the tokens do not fill it."""
    if grid is None or grid[0] * grid[1] != image_tokens:
        raise AttnkitError(f"this layer has {image_tokens} image tokens, which do not fill the image grid "
                           f"{grid} of the transformer call (extra image tokens, e.g. reference-image tokens of "
                           "an editing pipeline, are not supported)")
    return grid
