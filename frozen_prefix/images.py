"""Reading images from disk into RGB PIL images, with one-line errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

ImageLike = Image.Image | str | Path | bytes


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16, ...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: rescale to 8 bit instead of clipping at 255
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array / peak * 255.0).round().astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """Open a path, bytes or PIL image as a fully decoded RGB image; raise DataError if unreadable."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    name = "<bytes>" if isinstance(image, bytes) else str(image)
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            opened.load()  # decode now, so truncated files fail here and not in a worker later
            return to_rgb(opened)
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}; check the path in your data source") from None
    except UnidentifiedImageError:
        raise DataError(f"not an image file: {name}; remove it or set data.bad_data=skip") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {name} ({e}); remove it or set data.bad_data=skip") from None
