"""Reading one image file into a float tensor, with errors that name the file, and the one rule
that maps stored pixel values to [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

# PIL modes whose pixels are not 8 bits a channel, read as one grey channel of these values
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def unit_pixels(array: np.ndarray, source: str) -> np.ndarray:
    """Stored pixels as float32 in [0, 1]: ``uint8`` / 255, ``uint16`` / 65535, ``bool`` as
    0 / 1, a float array as it is once it is finite and within [0, 1]. Anything else (another
    integer type, NaN, values outside the range of the type) is a ``ValueError`` naming
    ``source``: a wrong scale would pass silently as near-constant images."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype in (np.uint8, np.uint16):
        return array.astype(np.float32) / np.iinfo(array.dtype).max
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{source}: pixels hold NaN or infinite values")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise ValueError(
                f"{source}: float pixels must lie in [0, 1], found {low:g} .. {high:g} "
                "(store uint8 for 0 .. 255)"
            )
        return array.astype(np.float32)
    raise ValueError(
        f"{source}: pixels of type {array.dtype} (expected uint8, uint16, bool, or float in [0, 1])"
    )


def read_image(path: Path, mode: str, size: int) -> Tensor:
    """The image at ``path`` in ``mode`` ('L' or 'RGB'), resized to size x size (LANCZOS),
    as a (C, size, size) float tensor in [0, 1]. Every PIL mode maps its full range to [0, 1]:
    8-bit modes through PIL's conversion, 16-bit grey (``I;16``, and ``I`` holding 0 .. 65535)
    by 65535, float grey (``F``) as it is once within [0, 1] (``unit_pixels``). An unreadable
    file, or one so large that Pillow's decompression-bomb limit refuses it, is a
    ``ValueError`` naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            array = _unit_array(image, mode, size, str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    except Image.DecompressionBombError as error:  # Pillow's limit (Image.MAX_IMAGE_PIXELS)
        raise ValueError(f"refusing image {path}: {error}") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _unit_array(image: Image.Image, mode: str, size: int, source: str) -> np.ndarray:
    """``image`` in ``mode`` at size x size, float32 in [0, 1]."""
    if image.mode not in _WIDE_MODES and image.mode != "F":
        pixels = image.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
        return unit_pixels(np.asarray(pixels), source)
    values = np.asarray(image)
    if image.mode != "F":
        top = _WIDE_MODES[image.mode]
        if values.min() < 0 or values.max() > top:
            raise ValueError(f"{source}: {image.mode} pixels outside 0 .. {top}")
        values = values.astype(np.float32) / top
    grey = unit_pixels(values.astype(np.float32), source)
    resized = Image.fromarray(grey, mode="F").resize((size, size), Image.Resampling.LANCZOS)
    unit = np.clip(np.asarray(resized), 0.0, 1.0)  # LANCZOS rings slightly past the range
    return unit if mode == "L" else np.repeat(unit[..., None], 3, axis=-1)
