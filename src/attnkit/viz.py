"""Pictures of attention: heatmap overlays, per-word strips, captioned grids, PNGs that remember their settings.

    strip = word_strip(image, store.word_maps(prompt))      # one overlay per word, the word under each
    save_png(strip, "maps.png", {"prompt": prompt, "seed": 8888})
    read_png_metadata("maps.png")["seed"]                   # 8888

Every function takes and returns PIL images; maps are 2-D tensors (or arrays) of any resolution and are
upsampled to the picture. Small images (the bundled model makes 64x64 ones) are enlarged to at least
``MIN_SIDE`` pixels so that strips and grids stay readable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

MIN_SIDE = 256
METADATA_KEY = "attnkit"  # the PNG text chunk holding the whole record as JSON


def _as_map(heatmap: Any) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(heatmap) if not isinstance(heatmap, torch.Tensor) else heatmap)
    m = m.detach().float().cpu().squeeze()
    if m.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D (H, W), got shape {tuple(m.shape)}")
    return m


def normalize(heatmap: Any) -> torch.Tensor:
    """Scale one map to [0, 1] by its own min and max (a constant map becomes all zeros)."""
    m = _as_map(heatmap)
    low, high = m.min(), m.max()
    if float(high - low) <= 1e-12:
        return torch.zeros_like(m)
    return (m - low) / (high - low)


def upsample(heatmap: Any, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a 2-D map to ``size`` = (width, height), PIL's order."""
    m = _as_map(heatmap)
    width, height = size
    if tuple(m.shape) == (height, width):
        return m
    return F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def colorize(heatmap: Any, cmap: str = "jet", size: tuple[int, int] | None = None) -> Image.Image:
    """A normalised map painted with a matplotlib colormap, as an RGB image (optionally resized)."""
    import matplotlib

    m = normalize(heatmap)
    if size is not None:
        m = upsample(m, size).clamp(0, 1)
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r} (try 'jet', 'viridis', 'inferno')") from None
    rgb = colormap(m.numpy())[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def enlarge(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """Enlarge ``image`` so that its shorter side is at least ``min_side`` (integer factors keep pixels crisp)."""
    short = min(image.size)
    if short >= min_side:
        return image
    factor = math.ceil(min_side / short)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def overlay(image: Image.Image, heatmap: Any, cmap: str = "jet", alpha: float = 0.5) -> Image.Image:
    """``heatmap`` upsampled to ``image``'s size, normalised, coloured and blended over it (``alpha`` = map).

    ``overlay(image, store.word_map(prompt, "cat"))``
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    return Image.blend(base, colorize(heatmap, cmap, size=base.size), alpha)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable when FreeType is available)
    except TypeError:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels; what does not fit into
    ``max_lines`` lines ends in an ellipsis (prompts are the point of a caption, so they wrap, not clip)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], " ".join(lines[max_lines - 1 :])]
    return [_fit(draw, line, font, width) for line in lines] or [""]


def _captioned(tiles: Sequence[Image.Image], captions: Sequence[str] | None, cols: int,
               pad: int = 4, background: str = "white", max_lines: int = 4) -> Image.Image:
    """Tiles (same size) in a grid of ``cols`` columns with a caption (wrapped, up to ``max_lines``
    lines) under each."""
    tile_w, tile_h = tiles[0].size
    font_size = max(12, tile_w // 14)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, str(c), font, tile_w, max_lines) for c in captions] if captions is not None else []
    line_h = font_size + 2
    caption_h = max(len(w) for w in wrapped) * line_h + 2 * pad if wrapped else 0
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * (tile_w + pad) + pad, rows * (tile_h + caption_h + pad) + pad), background)
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x = pad + (i % cols) * (tile_w + pad)
        y = pad + (i // cols) * (tile_h + caption_h + pad)
        sheet.paste(tile.convert("RGB"), (x, y))
        for k, line in enumerate(wrapped[i] if wrapped else []):
            text_w = draw.textlength(line, font=font)
            draw.text((x + (tile_w - text_w) / 2, y + tile_h + pad + k * line_h), line, fill="black", font=font)
    return sheet


def image_grid(images: Sequence[Image.Image], captions: Sequence[str] | None = None, cols: int | None = None,
               min_side: int = MIN_SIDE) -> Image.Image:
    """Images side by side (``cols`` per row, default all in one row) with a caption under each.

    ``image_grid([source, edited], ["a cat", "a dog"])``
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    tiles = [enlarge(im.convert("RGB"), min_side) for im in images]
    size = tiles[0].size  # tiles share the first image's size so that the grid stays regular
    tiles = [t if t.size == size else t.resize(size, Image.Resampling.BICUBIC) for t in tiles]
    return _captioned(tiles, captions, cols or len(tiles))


def word_strip(image: Image.Image, maps: Mapping[str, Any], cmap: str = "jet", alpha: float = 0.5,
               include_image: bool = True, min_side: int = MIN_SIDE, cols: int | None = None) -> Image.Image:
    """A row of overlays, one per word with the word under it (the Prompt-to-Prompt paper's figure),
    after the generated image itself when ``include_image``.

    ``word_strip(image, store.word_maps("a red circle and a blue square"))``
    """
    if not maps:
        raise ValueError("word_strip needs at least one word map")
    base = enlarge(image.convert("RGB"), min_side)
    tiles = ([base] if include_image else []) + [overlay(base, m, cmap, alpha) for m in maps.values()]
    captions = (["image"] if include_image else []) + list(maps)
    return _captioned(tiles, captions, cols or len(tiles))


def map_grid(maps: Any, captions: Sequence[str] | None = None, cmap: str = "viridis", cols: int | None = None,
             image: Image.Image | None = None, alpha: float = 0.5, min_side: int = MIN_SIDE) -> Image.Image:
    """Maps ``(k, H, W)`` (or a list of 2-D maps) as coloured tiles, each normalised on its own, e.g. the
    principal components of self-attention; over ``image`` when one is given.

    ``map_grid(store.self_components(k=6), cols=3)``
    """
    items = list(maps)
    if not items:
        raise ValueError("map_grid needs at least one map")
    if image is not None:
        base = enlarge(image.convert("RGB"), min_side)
        tiles = [overlay(base, m, cmap, alpha) for m in items]
    else:
        first = _as_map(items[0])
        side = max(min_side, *first.shape)
        scale = side / max(first.shape)
        size = (round(first.shape[1] * scale), round(first.shape[0] * scale))
        tiles = [colorize(m, cmap).resize(size, Image.Resampling.NEAREST) for m in items]
    return _captioned(tiles, captions, cols or min(len(tiles), 6))


def save_png(image: Image.Image, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``image`` as PNG with ``metadata`` in text chunks: one chunk per key (strings as they are, other
    values as JSON) plus ``attnkit`` holding the whole record as JSON (read it back with
    :func:`read_png_metadata`). ``save_png(img, "out.png", {"prompt": p, "seed": 1, "steps": 50})``"""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} does not end in .png")
    info = PngInfo()
    record = dict(metadata or {})
    for key, value in record.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value, default=str))
    info.add_text(METADATA_KEY, json.dumps(record, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The record :func:`save_png` wrote into a PNG (an empty dict for PNGs without one)."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return json.loads(text[METADATA_KEY]) if METADATA_KEY in text else {}
