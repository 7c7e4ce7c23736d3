"""Reading one image file into a float tensor, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor


def read_image(path: Path, mode: str, size: int) -> Tensor:
    """The image at ``path`` in PIL ``mode`` ('L' or 'RGB'), resized to size x size (LANCZOS),
    as a (C, size, size) float tensor in [0, 1]. An unreadable file, or one so large that
    Pillow's decompression-bomb limit refuses it, is a ``ValueError`` naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            pixels = image.convert(mode).resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(pixels, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    except Image.DecompressionBombError as error:  # Pillow's limit (Image.MAX_IMAGE_PIXELS)
        raise ValueError(f"refusing image {path}: {error}") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
