"""Uploads decoded from memory with size and pixel limits, and saved inversions zipped and unzipped safely.

    image = decode_image(data)                     # bytes → RGB PIL image, or an AttnkitError naming the limit
    zip_path = zip_inversion(folder, target)       # inversion.safetensors + inversion.json + image.png
    unzip_inversion(data, folder)                  # only those three names, each size-checked

Nothing a user sends is ever written under a name they chose: images are re-encoded under generated names by
the caller, and a zip's entries are read by the three names an inversion has, never extracted as they are.
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

from PIL import Image

from attnkit.engine import AttnkitError

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 4096 * 4096  # a decompression bomb (a tiny file that decodes to gigapixels) is refused before decoding
INVERSION_FILES = ("inversion.safetensors", "inversion.json", "image.png")
MAX_INVERSION_BYTES = 200 * 2**20  # per file, unpacked: SD1.5 at 512 px with 50 null-text steps is ~8 MB


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_UPLOAD_BYTES
                 ) -> Image.Image:
    """An RGB image from uploaded bytes, refusing oversized files and images of more than ``max_pixels``."""
    from attnkit.images import load_image

    if not data:
        raise AttnkitError("no image uploaded: choose an image file first")
    if len(data) > max_bytes:
        raise AttnkitError(f"the upload is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # read from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise AttnkitError(f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels "
                                   "(about 4096x4096): scale it down first")
            image.load()
    except AttnkitError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise AttnkitError(f"the image is too large to decode safely ({error})") from None
    except Exception as error:  # noqa: BLE001 - whatever PIL says about a bad file, the user sees one line
        raise AttnkitError(f"the upload is not an image PIL can read (PNG, JPEG, WebP, ...): {error}") from None
    return load_image(image)


def zip_inversion(folder: Path, target: Path) -> Path:
    """Zip an inversion folder's files (for download)."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in INVERSION_FILES:
            if (folder / name).is_file():
                archive.write(folder / name, arcname=name)
    return target


def unzip_inversion(data: bytes | None, folder: Path) -> Path:
    """Write the inversion files of an uploaded zip into ``folder`` (created): only the names an inversion has,
    each at most :data:`MAX_INVERSION_BYTES` unpacked. Returns ``folder``."""
    if not data:
        raise AttnkitError("no file uploaded: choose the inversion.zip the Real image tab gave you")
    if len(data) > MAX_UPLOAD_BYTES * 10:
        raise AttnkitError("the upload is too large to be an attnkit inversion")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise AttnkitError("the upload is not a zip file: upload the inversion.zip the Real image tab gave you") from None
    with archive:
        names = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
        missing = [n for n in INVERSION_FILES[:2] if n not in names]
        if missing:
            raise AttnkitError(f"the zip has no {missing[0]}: upload the inversion.zip the Real image tab gave you")
        folder.mkdir(parents=True, exist_ok=True)
        for name in INVERSION_FILES:
            info = names.get(name)
            if info is None:
                continue
            if info.file_size > MAX_INVERSION_BYTES:
                raise AttnkitError(f"{name} in the zip is {info.file_size / 2**20:.0f} MB unpacked: too large")
            with archive.open(info) as source:
                payload = source.read(MAX_INVERSION_BYTES + 1)
            if len(payload) > MAX_INVERSION_BYTES:
                raise AttnkitError(f"{name} in the zip is too large")
            (folder / name).write_bytes(payload)
    return folder
