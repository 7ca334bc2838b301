"""Reading images from disk into RGB PIL images, with one-line errors."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

ImageLike = Image.Image | str | Path | bytes | dict


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (L, P, RGBA, CMYK, I;16, ...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: rescale to 8 bit instead of clipping at 255. A fixed scale (not the
        # image's own peak) keeps dark images dark: 16-bit files span 0..65535 whatever they show.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max()
        full = 1.0 if image.mode == "F" and peak <= 1 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        image = Image.fromarray((array.clip(0, None) / full * 255.0).round().astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """Open a path, bytes, {"bytes", "path"} dict or PIL image as decoded RGB; raise DataError if unreadable."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, dict):  # Hugging Face datasets' undecoded Image value
        data, path = image.get("bytes"), image.get("path")
        if data is None and path is None:
            raise DataError("a record has no image (empty bytes and path); remove it or set data.bad_data=skip")
        return _open(data if data is not None else path, str(path or "<bytes>"))
    if image is None:
        raise DataError("a record has no image; remove it or set data.bad_data=skip")
    return _open(image, "<bytes>" if isinstance(image, bytes) else str(image))


# Seen from PIL plugins on malformed headers and truncated streams: index/struct arithmetic on garbage values.
_PLUGIN_ERRORS = (IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError, struct.error,
                  EOFError, NotImplementedError, MemoryError)


def _open(image: str | Path | bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            opened.load()  # decode now, so truncated files fail here and not in a worker later
            return to_rgb(opened)
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {name}; check the path in your data source") from e
    except UnidentifiedImageError as e:
        raise DataError(f"not an image file: {name}; remove it or set data.bad_data=skip") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {name} ({e}); remove it or set data.bad_data=skip") from e
    except _PLUGIN_ERRORS as e:  # what malformed files make PIL's format plugins raise besides OSError
        raise DataError(
            f"cannot decode image {name} ({type(e).__name__}: {e}); remove it or set data.bad_data=skip"
        ) from e
