"""Pictures of attention: heatmap overlays, per-word strips, captioned grids, PNGs that remember their settings.

    strip = word_strip(image, store.word_maps(prompt))      # one overlay per word, the word under each
    save_png(strip, "maps.png", {"prompt": prompt, "seed": 8888})
    read_png_metadata("maps.png")["seed"]                   # 8888

Every function takes and returns PIL images; maps are 2-D tensors (or arrays) of any resolution and are
upsampled to the picture. Small images (the bundled model makes 64x64 ones) are enlarged to at least
``MIN_SIDE`` pixels so that strips and grids stay readable.

Overlays paint the heat over a grey copy of the image, with a perceptual colormap (inferno) whose opacity
follows the map's value: every colour in an overlay is attention, never the image's own red or blue object,
and where the map is zero the picture stays grey. Captions are drawn with a font that has their characters;
characters no font here can draw (emoji, most scripts without a system font) are written out by name
(``[dark sunglasses]``) instead of as empty boxes.
"""

from __future__ import annotations

import functools
import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

MIN_SIDE = 256
METADATA_KEY = "attnkit"  # the PNG text chunk holding the whole record as JSON
HEAT_CMAP = "inferno"  # perceptual, dark to bright: over a grey image its colours can only mean heat


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


def colormap_names() -> list[str]:
    """matplotlib's colormaps (without the reversed ``_r`` twins), sorted."""
    import matplotlib

    return sorted((n for n in matplotlib.colormaps if not n.endswith("_r")), key=str.lower)


def check_cmap(cmap: str) -> str:
    """``cmap`` if matplotlib has that colormap, else a ValueError listing the ones there are."""
    import matplotlib

    if cmap in matplotlib.colormaps:
        return cmap
    raise ValueError(f"unknown colormap {cmap!r}: use one of matplotlib's: {', '.join(colormap_names())} "
                     "(each also reversed with _r; inferno and viridis read best as heat)")


def colorize(heatmap: Any, cmap: str = HEAT_CMAP, size: tuple[int, int] | None = None) -> Image.Image:
    """A normalised map painted with a matplotlib colormap, as an RGB image (optionally resized)."""
    import matplotlib

    m = normalize(heatmap)
    if size is not None:
        m = upsample(m, size).clamp(0, 1)
    rgb = matplotlib.colormaps[check_cmap(cmap)](m.numpy())[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def enlarge(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """Enlarge ``image`` so that its shorter side is at least ``min_side`` (integer factors keep pixels crisp)."""
    short = min(image.size)
    if short >= min_side:
        return image
    factor = math.ceil(min_side / short)
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def muted(image: Image.Image) -> Image.Image:
    """``image`` in grey with its contrast squeezed into the middle of the range (luminance 0..255 becomes
    48..176): the base of an overlay, so that neither a white nor a black background hides the heat."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    out = (48.0 + grey * (128.0 / 255.0)).round().astype(np.uint8)
    return Image.fromarray(out, "L").convert("RGB")


def overlay(image: Image.Image, heatmap: Any, cmap: str = HEAT_CMAP, alpha: float = 0.8,
            base: Literal["grey", "image"] = "grey") -> Image.Image:
    """``heatmap`` upsampled to ``image``'s size, normalised and painted over it: each pixel takes the
    colormap's colour with opacity ``alpha`` × the map's value there (0 where the map is lowest, ``alpha`` at
    its peak). ``base="grey"`` (default) paints over :func:`muted` (a grey copy), so a red object cannot pass
    for heat; ``base="image"`` over the image's own colours.

    ``overlay(image, store.word_map(prompt, "cat"))``
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if base not in ("grey", "image"):
        raise ValueError(f"base must be 'grey' or 'image', got {base!r}")
    under = muted(image) if base == "grey" else image.convert("RGB")
    heat = np.asarray(colorize(heatmap, cmap, size=under.size), dtype=np.float32)
    weight = alpha * upsample(normalize(heatmap), under.size).clamp(0, 1).numpy()[..., None]
    mixed = np.asarray(under, dtype=np.float32) * (1.0 - weight) + heat * weight
    return Image.fromarray(mixed.round().astype(np.uint8), "RGB")


def mark_point(image: Image.Image, y: float, x: float, radius: int | None = None) -> Image.Image:
    """A copy of ``image`` with a ring around pixel (``y``, ``x``): black outside, white inside, so it shows
    on any background. ``mark_point(image, 120.5, 64.5)``"""
    marked = image.convert("RGB")
    draw = ImageDraw.Draw(marked)
    r = radius or max(4, marked.width // 32)
    w = max(2, r // 3)
    draw.ellipse((x - r - w, y - r - w, x + r + w, y + r + w), outline="black", width=w)
    draw.ellipse((x - r, y - r, x + r, y + r), outline="white", width=w)
    return marked


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # DejaVu (most Linux systems) draws accents, Greek and Cyrillic; Pillow's own font only ASCII
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable when FreeType is available)
    except TypeError:
        return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _has_glyph(font: Any, char: str) -> bool:
    """Whether ``font`` draws ``char`` as itself, not as its "missing glyph" box (that of a private-use code
    point, which no font draws)."""
    def mask(c: str) -> tuple[bytes, tuple[int, int]]:
        m = font.getmask(c)
        return bytes(m), m.size

    try:
        return mask(char) != mask("\ue000")
    except (AttributeError, UnicodeEncodeError, ValueError):  # bitmap fonts: Latin-1 only
        return char.isascii()


def drawable(text: str, font: Any) -> str:
    """``text`` with what ``font`` cannot draw replaced: accents dropped where the bare letter exists,
    invisible marks (variation selectors, joiners) removed, anything else written as its Unicode name in
    brackets. ``drawable("cat 🕶️", font)  # "cat [dark sunglasses]"``"""
    out = []
    for char in text:
        code, category = ord(char), unicodedata.category(char)
        if char.isascii():
            out.append(char)
        elif 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF or category in ("Cf", "Cc"):
            continue  # variation selectors, joiners, controls: nothing to see, some fonts draw them anyway
        elif _has_glyph(font, char):
            out.append(char)
        elif category in ("Mn", "Me"):
            continue
        else:
            bare = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
            if bare and bare != char and all(c.isascii() or _has_glyph(font, c) for c in bare):
                out.append(bare)
            else:
                out.append(f"[{unicodedata.name(char, f'U+{ord(char):04X}').lower()}]")
    return "".join(out)


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
    wrapped = ([_wrap(measure, drawable(str(c), font), font, tile_w, max_lines) for c in captions]
               if captions is not None else [])
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


def word_strip(image: Image.Image, maps: Mapping[str, Any], cmap: str = HEAT_CMAP, alpha: float = 0.8,
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


def segment_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct RGB colours for segment maps (matplotlib's tab10, then tab20's lighter shades)."""
    import matplotlib

    table = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["tab20"].colors[1::2])
    return [tuple(int(round(255 * c)) for c in table[i % len(table)][:3]) for i in range(count)]


def segment_overlay(image: Image.Image, label_map: Any, legend: Sequence[str], alpha: float = 0.55,
                    min_side: int = MIN_SIDE) -> Image.Image:
    """Segments ``label_map`` (H, W ints indexing ``legend``) painted with opacity ``alpha`` over a grey copy of
    ``image`` (:func:`muted`: a segment's colour is never confused with an object's own), segment borders in
    white, and a legend column (colour swatch + text, e.g. ``"1 – cat 0.65"``) on the right.

    ``segment_overlay(seg.image, seg.label_map, seg.legend())``
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = np.asarray(label_map, dtype=np.int64)
    if labels.ndim != 2:
        raise ValueError(f"a label map must be 2-D (H, W), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(legend)):
        raise ValueError(f"label map values must index the {len(legend)} legend entries")
    base = enlarge(image.convert("RGB"), min_side)
    nearest = Image.fromarray(labels.astype(np.int32), "I").resize(base.size, Image.Resampling.NEAREST)
    big = np.asarray(nearest, dtype=np.int64)
    colors = np.asarray(segment_colors(len(legend)), dtype=np.float32)
    painted = np.asarray(muted(base), dtype=np.float32) * (1 - alpha) + colors[big] * alpha
    edge = np.zeros(big.shape, bool)  # one-pixel borders between segments, in white
    edge[1:] |= big[1:] != big[:-1]
    edge[:, 1:] |= big[:, 1:] != big[:, :-1]
    painted[edge] = 255.0
    picture = Image.fromarray(painted.round().astype(np.uint8), "RGB")
    font_size = max(12, base.height // 18)
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [drawable(str(t), font) for t in legend]
    line_h = font_size + 6
    swatch = font_size
    text_w = max((measure.textlength(t, font=font) for t in texts), default=0)
    panel_w = int(text_w + swatch + 24)
    sheet = Image.new("RGB", (base.width + panel_w, max(base.height, line_h * len(texts) + 8)), "white")
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(texts):
        y = 6 + i * line_h
        x = base.width + 8
        draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(int(c) for c in colors[i]), outline="black")
        draw.text((x + swatch + 6, y), text, fill="black", font=font)
    return sheet
