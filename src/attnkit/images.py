"""Reading users' images and fitting them to a model's resolution, with the crop stated in a record.

    image = load_image("photo.jpg")                     # any PIL-readable file or PIL image -> RGB
    fitted, crop = fit_image(image, 512, 512)           # centre crop to the aspect ratio, then resize
    crop.to_dict()   # {"original_size": [640, 480], "box": [80, 0, 560, 480], "size": [512, 512], ...}

Every problem (missing or unreadable file, not an image, an image too small to upscale) is an
:class:`~attnkit.engine.AttnkitError` whose message names the fix. Transparent images are composited onto a
background colour (white unless told otherwise) and greyscale/palette/CMYK/16-bit images become RGB.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from attnkit.engine import AttnkitError

CropMode = Literal["center", "stretch"]
MIN_SIDE = 8  # pixels: below this an image carries no usable content at any model resolution
MAX_UPSCALE = 8  # an image whose shorter side needs more than 8x upscaling is refused as "tiny"


@dataclass(frozen=True)
class Crop:
    """How an input image was fitted to the model: ``box`` (left, top, right, bottom) cut from the original
    (``original_size`` = width, height), resized to ``size`` (width, height). ``mode`` is "center" (crop to the
    target aspect ratio first) or "stretch" (whole image resized, aspect ratio not kept)."""

    original_size: tuple[int, int]
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    mode: str = "center"
    original_mode: str = "RGB"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Crop:
        return cls(original_size=tuple(data["original_size"]), box=tuple(data["box"]), size=tuple(data["size"]),
                   mode=str(data.get("mode", "center")), original_mode=str(data.get("original_mode", "RGB")))


def load_image(source: Any, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image or a uint8 array (H, W[, C]).

    EXIF orientation is applied; transparency is composited onto ``background``.
    ``load_image("photo.png").size  # (width, height)``
    """
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        try:
            image = Image.fromarray(source)
        except (TypeError, ValueError) as error:
            raise AttnkitError(f"cannot read an array of shape {source.shape} and dtype {source.dtype} as an "
                               "image: pass uint8 (H, W) or (H, W, 3|4)") from error
    elif isinstance(source, str | os.PathLike):
        image = _open(Path(source))
    else:
        raise AttnkitError(f"cannot read an image from a {type(source).__name__}: pass a file path, a PIL image "
                           "or a uint8 numpy array")
    mode = str(image.info.get("original_mode", image.mode))  # an image we loaded before keeps its record
    rgb = to_rgb(ImageOps.exif_transpose(image) or image, background)
    if rgb is image:
        rgb = image.copy()  # never hand back (and tag) the caller's own object
    rgb.info["original_mode"] = mode  # fit_image states it in the crop record
    return rgb


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise AttnkitError(f"image file {str(path)!r} does not exist: check the path")
    if path.is_dir():
        raise AttnkitError(f"{str(path)!r} is a folder, not an image file: pass the path of one image")
    try:
        image = Image.open(path)
        image.load()  # decode now, so truncated or corrupt files fail here and not later
    except UnidentifiedImageError as error:
        raise AttnkitError(f"{str(path)!r} is not an image PIL can read (PNG, JPEG, WebP, ...): pass an "
                           "image file") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise AttnkitError(f"cannot read image {str(path)!r} ({error}): the file may be truncated or corrupt, "
                           "or not readable by this user") from error
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited onto ``background``, 16-bit and float scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's own conversion clips these at 255; scale the actual range instead.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        if mode == "F" and values.max() <= 1.0:
            peak = 1.0
        grey = np.clip(values / peak * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, width: int, height: int, mode: CropMode = "center",
              min_side: int | None = None) -> tuple[Image.Image, Crop]:
    """Resize (and crop) ``image`` to ``width`` x ``height``; returns the fitted image and its :class:`Crop`.

    ``mode="center"`` keeps the aspect ratio by cutting the largest centred box of the target's aspect ratio;
    ``"stretch"`` resizes the whole image. Images smaller than ``min_side`` pixels (default: 8, or 1/8 of the
    target side) are refused rather than upscaled into mush.
    ``fitted, crop = fit_image(load_image("photo.jpg"), 512, 512)``
    """
    if mode not in ("center", "stretch"):
        raise AttnkitError(f"unknown crop mode {mode!r}: use 'center' or 'stretch'")
    w, h = image.size
    need = max(MIN_SIDE, -(-min(width, height) // MAX_UPSCALE)) if min_side is None else int(min_side)
    if min(w, h) < need:
        raise AttnkitError(f"the image is only {w}x{h} pixels; this model works at {width}x{height} and needs "
                           f"at least {need} pixels on the shorter side: use a larger image")
    if mode == "stretch":
        box = (0, 0, w, h)
    else:
        # The largest box of the target aspect ratio, centred; integer pixels so the record is exact.
        if w * height > h * width:
            cw, ch = round(h * width / height), h
        else:
            cw, ch = w, round(w * height / width)
        left, top = (w - cw) // 2, (h - ch) // 2
        box = (left, top, left + cw, top + ch)
    fitted = image.crop(box) if box != (0, 0, w, h) else image
    if fitted.size != (width, height):
        fitted = fitted.resize((width, height), Image.Resampling.LANCZOS)
    crop = Crop(original_size=(w, h), box=box, size=(width, height), mode=mode,
                original_mode=str(image.info.get("original_mode", image.mode)))
    return fitted.copy() if fitted is image else fitted, crop


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A (1, 3, H, W) float32 tensor in [-1, 1] from an RGB PIL image (the VAE's input range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def mse(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """Mean squared error between two images (PIL or uint8 arrays) on a [0, 1] scale, over ``mask`` (bool,
    H x W) when given. ``mse(original, reconstruction)``"""
    x = np.asarray(load_image(a) if isinstance(a, Image.Image) else a, dtype=np.float64) / 255.0
    y = np.asarray(load_image(b) if isinstance(b, Image.Image) else b, dtype=np.float64) / 255.0
    if x.shape != y.shape:
        raise AttnkitError(f"cannot compare images of shapes {x.shape} and {y.shape}")
    if mask is not None:
        if not mask.any():
            raise AttnkitError("the comparison mask selects no pixels: pass a mask with at least one True pixel")
        x, y = x[mask], y[mask]
    return float(np.mean((x - y) ** 2))


def psnr(a: Any, b: Any, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL or uint8 arrays) on a [0, 1] scale.

    ``mask`` (bool, H x W) restricts the comparison to those pixels. ``psnr(original, reconstruction)``
    """
    error = mse(a, b, mask)
    return float("inf") if error == 0 else 10.0 * float(np.log10(1.0 / error))


def paste_outside(edited: Image.Image, original: Image.Image, mask: torch.Tensor) -> Image.Image:
    """``edited`` inside ``mask`` (a bool latent-grid mask, ``(h, w)``), ``original`` pixel for pixel outside it.

    The mask is resized (nearest) to the image and feathered over half a latent cell, so no seam shows.
    Latent blending alone cannot keep unedited pixels better than the autoencoder's round trip; this final
    composite keeps them exactly (the background reconstruction problem of Blended Latent Diffusion,
    Avrahami et al. 2023). ``paste_outside(result.edits[0], inv.image, result.blend_masks[1])``
    """
    from PIL import ImageFilter

    if edited.size != original.size:
        raise AttnkitError(f"cannot paste: the edit is {edited.size} but the original is {original.size}")
    alpha = Image.fromarray(mask.detach().cpu().numpy().astype(np.uint8) * 255, "L")
    alpha = alpha.resize(edited.size, Image.Resampling.NEAREST)
    cell = edited.size[0] / mask.shape[-1]
    alpha = np.asarray(alpha.filter(ImageFilter.GaussianBlur(radius=cell / 2)), np.float32)[..., None] / 255.0
    mixed = alpha * np.asarray(edited.convert("RGB"), np.float32)
    mixed += (1.0 - alpha) * np.asarray(original.convert("RGB"), np.float32)
    return Image.fromarray(np.rint(mixed).astype(np.uint8), "RGB")
