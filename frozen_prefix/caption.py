"""`python -m frozen_prefix.caption --model MODEL_DIR IMAGE [IMAGE ...]`: one caption per image."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from . import cli
from .captioner import FrozenPrefixCaptioner
from .config import load_config
from .errors import DataError
from .generate import decoding_options, generate_captions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_paths(inputs: list[str]) -> list[Path]:
    """Expand the command-line inputs: image files, folders of images (sorted), JSON Lines files naming images."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); give image files")
            paths.extend(found)
        elif path.suffix.lower() == ".jsonl":
            paths.extend(_jsonl_images(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"image file not found: {path}; give image files, a folder or a .jsonl file")
    return paths


def _jsonl_images(path: Path) -> list[Path]:
    """The "image" of every line, relative to the file's folder unless absolute (captions are not needed)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the path")
    images = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
            raise DataError(f'{path}:{lineno}: each line needs an "image" path string')
        image = Path(obj["image"]).expanduser()
        images.append(image if image.is_absolute() else path.parent / image)
    if not images:
        raise DataError(f"{path} names no images; add lines like {{\"image\": \"a.jpg\"}}")
    return images


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    """Consecutive slices of at most size items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def main(argv: list[str] | None = None) -> int:
    """Print one caption per image, as IMAGE<TAB>CAPTION lines (--jsonl: JSON objects; --plain: captions only)."""
    parser = argparse.ArgumentParser(prog="python -m frozen_prefix.caption", description=main.__doc__)
    parser.add_argument("--model", required=True, help="a saved model folder (a run's model/ or best/)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders of images, or .jsonl files")
    cli.add_device_arg(parser)
    cli.add_trust_arg(parser)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--plain", action="store_true", help="print the captions only, one per line")
    output.add_argument("--jsonl", action="store_true", help='print {"image": ..., "caption": ...} lines')
    cli.add_generation_args(parser)
    cli.add_plugin_arg(parser)
    args = parser.parse_args(argv)
    cli.setup_logging()

    def command() -> None:
        cli.import_plugins(args.plugin)
        paths = image_paths(args.images)  # before loading the model: a typo fails in a second, not a minute
        model = FrozenPrefixCaptioner.from_pretrained(
            args.model, device=cli.resolve_device(args.device), trust_remote_code=args.trust_remote_code
        )
        options = decoding_options(cli.apply_generation_args(load_config(model.config), args).eval)
        for chunk in _chunks(paths, options["batch_size"]):
            for path, caption in zip(chunk, generate_captions(model, chunk, **options), strict=True):
                if args.jsonl:  # the caption exactly as generated
                    print(json.dumps({"image": str(path), "caption": caption}))
                    continue
                line = " ".join(caption.split())  # a newline or tab inside a caption must not break one line per image
                print(line if args.plain else f"{path}\t{line}")
            sys.stdout.flush()  # captions appear batch by batch on long runs

    return cli.run(command)


if __name__ == "__main__":
    sys.exit(main())
