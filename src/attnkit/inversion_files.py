"""The folder an inversion is saved in: ``inversion.safetensors`` + ``inversion.json`` + ``image.png``.

Shared by the UNet inversions (:class:`attnkit.Inversion`) and the rectified-flow ones
(:class:`attnkit.FlowInversion`), so both write atomically (a temporary folder moved in at the end: a failure
leaves nothing partial) and refuse foreign folders with the same messages.

Usage::

    write_folder("out/photo", {"latents": x}, record, image, overwrite=False)
    record, tensors, image = read_folder("out/photo", "attnkit-inversion", 1, "Inversion.save or `attnkit invert --out`",
                                         "re-run the inversion with this attnkit")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .engine import AttnkitError

TENSORS_FILE, RECORD_FILE, IMAGE_FILE = "inversion.safetensors", "inversion.json", "image.png"


def write_folder(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], record: dict[str, Any],
                 image: Image.Image | None, overwrite: bool) -> Path:
    """Write one inversion into ``directory`` (created if missing) and return its path."""
    from safetensors.torch import save_file

    target = Path(directory)
    if (target / RECORD_FILE).exists() and not overwrite:
        raise AttnkitError(f"{target} already holds an inversion: pass overwrite=True or another folder")
    if target.exists() and not target.is_dir():
        raise AttnkitError(f"{target} exists and is not a folder: pass a folder path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                  str(staging / TENSORS_FILE))
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
        if image is not None:
            image.save(staging / IMAGE_FILE)
        if not target.exists():
            os.replace(staging, target)
        else:
            for item in staging.iterdir():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_folder(directory: str | os.PathLike, fmt: str, version: int, written_by: str, wrong_format_fix: str
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Image.Image | None]:
    """Read a folder written by :func:`write_folder`: its record, tensors and image (None when absent).
    ``written_by`` names what writes such folders, ``wrong_format_fix`` what to do with another kind."""
    from safetensors.torch import load_file

    source = Path(directory)
    for name in (RECORD_FILE, TENSORS_FILE):
        if not (source / name).is_file():
            raise AttnkitError(f"{source} is not an attnkit inversion folder (no {name}): pass the folder "
                               f"written by {written_by}")
    try:
        record = json.loads((source / RECORD_FILE).read_text())
    except json.JSONDecodeError as error:
        raise AttnkitError(f"{source / RECORD_FILE} is not valid JSON ({error})") from error
    if record.get("format") != fmt or int(record.get("version", 0)) > version:
        raise AttnkitError(f"{source / RECORD_FILE} is not an attnkit {fmt} record of version <= {version}: "
                           f"{wrong_format_fix}")
    image = Image.open(source / IMAGE_FILE).convert("RGB") if (source / IMAGE_FILE).is_file() else None
    return record, load_file(str(source / TENSORS_FILE)), image
