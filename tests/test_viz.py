"""Pictures: overlays put the heat where the map has it, strips and grids lay tiles out, PNGs keep metadata."""

import numpy as np
import pytest
import torch
from PIL import Image

from attnkit import image_grid, map_grid, overlay, read_png_metadata, save_png, word_strip
from attnkit.viz import MIN_SIDE, _font, _has_glyph, colorize, drawable, enlarge, mark_point, normalize


def grey(size=64):
    return Image.new("RGB", (size, size), (128, 128, 128))


def hot_corner(res=16):
    m = torch.zeros(res, res)
    m[: res // 4, : res // 4] = 3.0  # hot top-left corner, cold elsewhere
    return m


def test_normalize_per_map():
    m = normalize(torch.tensor([[2.0, 4.0], [6.0, 10.0]]))
    assert float(m.min()) == 0.0 and float(m.max()) == 1.0
    assert torch.equal(normalize(torch.full((4, 4), 7.0)), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="2-D"):
        normalize(torch.zeros(2, 3, 4))


def test_overlay_puts_heat_where_the_map_is():
    image = grey()
    full = overlay(image, hot_corner(), cmap="jet", alpha=1.0, base="image")
    assert full.size == image.size
    hot, cold = np.asarray(full)[4, 4], np.asarray(full)[60, 60]
    assert hot[0] > 100 and hot[2] < 30  # jet's top is red, painted fully where the map peaks
    assert np.array_equal(cold, [128, 128, 128])  # where the map is lowest the image shows through
    # alpha = 0 leaves the image as it was; alpha scales the heat's opacity.
    assert np.array_equal(np.asarray(overlay(image, hot_corner(), alpha=0.0, base="image")), np.asarray(image))
    half = np.asarray(overlay(image, hot_corner(), cmap="jet", alpha=0.5, base="image")).astype(int)
    expected = (np.asarray(full).astype(int) + 128) / 2
    assert np.abs(half - expected).max() <= 1
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, hot_corner(), alpha=2.0)


def test_the_default_overlay_cannot_pass_a_red_object_for_heat():
    """Before: jet blended over the image, so a red circle under a cold map still looked hot."""
    picture = np.full((64, 64, 3), 255, np.uint8)
    picture[40:60, 40:60] = (220, 30, 30)  # a red object where the map is cold
    picture[4:20, 4:20] = (30, 30, 220)  # a blue one where it is hot
    out = np.asarray(overlay(Image.fromarray(picture), hot_corner())).astype(int)
    red_object, white = out[50, 50], out[30, 30]
    assert red_object.max() - red_object.min() == 0 and white.max() - white.min() == 0  # plain grey, no hue
    assert 40 <= white[0] <= 190  # neither white nor black: the heat shows against both
    hot = out[10, 10]
    assert hot.max() - hot.min() > 60  # only the heat has colour (inferno: orange to yellow at the peak)


def test_the_query_marker_shows_on_white_and_on_black():
    for colour in ("white", "black"):
        marked = np.asarray(mark_point(Image.new("RGB", (64, 64), colour), 32, 32, radius=8)).astype(int)
        ring = marked[32, 20:44]  # across the ring
        assert (ring.sum(axis=1) < 60).any() and (ring.sum(axis=1) > 700).any(), colour  # black and white
        assert np.array_equal(marked[32, 32], [255, 255, 255] if colour == "white" else [0, 0, 0])


def test_captions_never_draw_missing_glyph_boxes():
    font = _font(16)
    text = drawable("a cat wearing 🕶️ in the café 中", font)
    assert "[dark sunglasses]" in text and "\ufe0f" not in text
    assert all(ch.isascii() or _has_glyph(font, ch) for ch in text), text
    assert drawable("a red circle", font) == "a red circle"
    sheet = image_grid([grey(64)], captions=["🕶️"])  # draws without error, the name under the tile
    assert sheet.height > MIN_SIDE


def test_colorize_uses_the_named_colormap():
    viridis = np.asarray(colorize(hot_corner(), "viridis"))
    jet = np.asarray(colorize(hot_corner(), "jet"))
    assert viridis.shape == jet.shape == (16, 16, 3)
    assert not np.array_equal(viridis, jet)
    with pytest.raises(ValueError, match="colormap"):
        colorize(hot_corner(), "no-such-map")


def test_small_images_are_enlarged_with_whole_factors():
    big = enlarge(grey(64))
    assert big.size == (MIN_SIDE, MIN_SIDE)
    assert enlarge(grey(300)).size == (300, 300)


def test_word_strip_has_one_captioned_tile_per_word():
    maps = {"red": hot_corner(), "circle": hot_corner().flip(0), "background": torch.ones(16, 16)}
    with_image = word_strip(grey(), maps)
    without = word_strip(grey(), maps, include_image=False)
    assert with_image.height == without.height > MIN_SIDE  # tiles of >= 256 px plus a caption line
    tile = (with_image.width - without.width)  # one tile (plus padding) more
    assert with_image.width == pytest.approx(4 * tile, abs=8)
    caption_band = np.asarray(without)[MIN_SIDE + 6:, : tile]
    assert (caption_band < 100).any()  # the word is written under its tile
    with pytest.raises(ValueError):
        word_strip(grey(), {})


def test_image_grid_layout_and_captions():
    images = [grey(64) for _ in range(5)]
    one_row = image_grid(images)
    two_cols = image_grid(images, captions=list("abcde"), cols=2)
    assert one_row.width > one_row.height
    assert two_cols.height > two_cols.width  # 3 rows of 2
    with pytest.raises(ValueError, match="captions"):
        image_grid(images, captions=["a"])


def test_map_grid_of_components():
    grid = map_grid(torch.randn(6, 8, 8), captions=[f"c{i}" for i in range(6)], cols=3)
    assert grid.width > grid.height and grid.width >= 3 * MIN_SIDE
    over = map_grid(torch.randn(2, 8, 8), image=grey(), cols=2)
    assert over.height >= MIN_SIDE


def test_png_metadata_round_trip(tmp_path):
    meta = {"prompt": "a café in the rain ☔", "seed": 8888, "settings": {"steps": 50, "guidance": 7.5}}
    path = save_png(grey(), tmp_path / "sub" / "image.png", meta)
    assert read_png_metadata(path) == meta
    with Image.open(path) as im:
        assert im.text["prompt"] == meta["prompt"]  # readable by any PNG tool, key by key
        assert im.text["seed"] == "8888"
    grey().save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") == {}
    with pytest.raises(ValueError, match="png"):
        save_png(grey(), tmp_path / "image.jpg", meta)


def test_long_captions_wrap_onto_more_lines_instead_of_being_cut():
    images = [grey(64), grey(64)]
    short = image_grid(images, captions=["a cake", "a lego cake"])
    prompt = "a red circle and a blue outlined square and a green triangle on a black background"
    long = image_grid(images, captions=[prompt, "a lego cake"])
    assert long.height > short.height  # a taller caption band, the same tiles
    band = np.asarray(long)[MIN_SIDE + 4:, :MIN_SIDE]
    inked_rows = np.flatnonzero((band < 100).any(axis=(1, 2)))
    assert inked_rows.max() - inked_rows.min() > 2 * 18  # text on at least three lines
