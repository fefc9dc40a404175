"""Loading users' images (files, modes, errors), fitting them to a model with a stated crop, and PSNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnkit.engine import AttnkitError
from attnkit.images import Crop, fit_image, image_to_tensor, load_image, paste_outside, psnr


def test_load_image_from_path_pil_and_array(tmp_path):
    source = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3).repeat(4, 0).repeat(4, 1), "RGB")
    source.save(tmp_path / "a.png")
    for item in (tmp_path / "a.png", str(tmp_path / "a.png"), source, np.asarray(source)):
        image = load_image(item)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(source))
    assert "original_mode" not in source.info  # the caller's image is never tagged or changed


def test_transparency_is_composited_onto_the_background():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    white = np.asarray(load_image(rgba))
    assert tuple(white[0, 0]) == (255, 0, 0) and tuple(white[5, 5]) == (255, 255, 255)
    assert tuple(np.asarray(load_image(rgba, background=(0, 0, 0)))[5, 5]) == (0, 0, 0)
    assert load_image(rgba).info["original_mode"] == "RGBA"
    assert load_image(load_image(rgba)).info["original_mode"] == "RGBA"  # loading twice keeps the record


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    image = load_image(Image.new("RGB", (16, 16), (200, 200, 200)).convert(mode))
    assert image.mode == "RGB" and image.info["original_mode"] == mode


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    grey = np.asarray(load_image(Image.fromarray(values)))  # PIL reads uint16 as "I;16"
    assert 120 <= grey[0, 0, 0] <= 135


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:50])
    cases = [(tmp_path / "text.jpg", "not an image"), (tmp_path / "none.png", "does not exist"),
             (tmp_path, "is a folder"), (tmp_path / "cut.png", "cannot read image"),
             (3.5, "cannot read an image"), (np.zeros((2, 2, 7), np.uint8), "cannot read an array")]
    for item, message in cases:
        with pytest.raises(AttnkitError, match=message):
            load_image(item)


def test_center_crop_states_its_box():
    wide = Image.new("RGB", (100, 50))
    fitted, crop = fit_image(wide, 64, 64)
    assert fitted.size == (64, 64)
    assert crop == Crop(original_size=(100, 50), box=(25, 0, 75, 50), size=(64, 64), mode="center")
    tall = Image.new("RGB", (30, 91))
    assert fit_image(tall, 64, 32)[1].box == (0, 38, 30, 53)  # 30 wide -> 15 tall, centred
    assert Crop.from_dict(crop.to_dict()) == crop


def test_stretch_keeps_the_whole_image_and_exact_size_is_untouched():
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    fitted, crop = fit_image(image, 64, 64)
    assert np.array_equal(np.asarray(fitted), np.asarray(image)) and crop.box == (0, 0, 64, 64)
    assert fit_image(Image.new("RGB", (40, 20)), 64, 64, mode="stretch")[1].box == (0, 0, 40, 20)
    with pytest.raises(AttnkitError, match="crop mode"):
        fit_image(image, 64, 64, mode="squash")  # type: ignore[arg-type]


def test_tiny_images_are_refused():
    with pytest.raises(AttnkitError, match="at least 8 pixels"):
        fit_image(Image.new("RGB", (7, 40)), 64, 64)
    with pytest.raises(AttnkitError, match="at least 64 pixels"):
        fit_image(Image.new("RGB", (60, 60)), 512, 512)  # more than 8x upscaling
    assert fit_image(Image.new("RGB", (64, 64)), 512, 512)[0].size == (512, 512)


def test_image_to_tensor_range_and_psnr():
    black, white = Image.new("RGB", (4, 4), "black"), Image.new("RGB", (4, 4), "white")
    assert image_to_tensor(black).min() == -1 and image_to_tensor(white).max() == 1
    assert image_to_tensor(black).shape == (1, 3, 4, 4)
    assert psnr(black, black) == float("inf") and psnr(black, white) == pytest.approx(0.0)
    half = np.zeros((4, 4, 3), np.uint8)
    half[:2] = 255
    mask = np.zeros((4, 4), bool)
    mask[2:] = True
    assert psnr(half, np.zeros_like(half), mask=mask) == float("inf")
    assert psnr(half, np.zeros_like(half)) == pytest.approx(10 * np.log10(2))


def test_paste_outside_keeps_the_original_outside_and_the_edit_inside():
    rng = np.random.default_rng(1)
    edited, original = (Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)) for _ in range(2))
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = True  # pixels 16..47
    out = np.asarray(paste_outside(edited, original, mask))
    assert (out[22:42, 22:42] == np.asarray(edited)[22:42, 22:42]).all()
    assert (out[:10] == np.asarray(original)[:10]).all() and (out[54:] == np.asarray(original)[54:]).all()
    edge = out[15:17, 30]  # the feathered seam mixes the two
    assert not (edge == np.asarray(original)[15:17, 30]).all()
    with pytest.raises(AttnkitError, match="paste"):
        paste_outside(edited, original.resize((32, 32)), mask)
