"""Check a COCO download for the Karpathy splits and write the config that trains on it.

    python scripts/prepare_coco.py --root data/coco [--karpathy data/coco/dataset_coco.json] [--out FILE]

--root holds the COCO 2014 images (train2014/, val2014/); dataset_coco.json (from Karpathy's
caption_datasets.zip) is looked for there unless --karpathy names it. The script counts images and
captions per split, lists missing files, decodes a sample of images, and writes configs/coco_karpathy.yaml
with your paths filled in (bad_data: skip when some images are missing or unreadable).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from frozen_prefix.config import load_config  # noqa: E402
from frozen_prefix.data.coco import read_coco, read_karpathy  # noqa: E402
from frozen_prefix.errors import DataError, FrozenPrefixError  # noqa: E402
from frozen_prefix.images import load_image  # noqa: E402

SPLITS = {"train": "train+restval", "val": "val", "test": "test"}
KARPATHY_NAMES = ("dataset_coco.json", "annotations/dataset_coco.json", "caption_datasets/dataset_coco.json")


def find_karpathy(root: Path, given: str | None) -> Path:
    """The Karpathy split file: as given, or in one of the usual places under root."""
    candidates = [Path(given)] if given else [root / name for name in KARPATHY_NAMES]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"no Karpathy split file at {' or '.join(map(str, candidates))}; download caption_datasets.zip "
        "(https://cs.stanford.edu/people/karpathy/deepimagesent/) and unzip dataset_coco.json there, or pass --karpathy"
    )


def check(root: Path, karpathy: Path, verify: int) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per split: images, captions, missing files, undecodable images in a sample; plus the problems found."""
    report: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    rng = random.Random(0)
    for name, split in SPLITS.items():
        records = read_karpathy(karpathy, split, image_dir=root).records
        missing = [r.image for r in records if not Path(r.image).is_file()]
        present = [r for r in records if Path(r.image).is_file()]
        bad = 0
        for record in rng.sample(present, min(verify, len(present))):
            try:
                load_image(record.image)
            except DataError as e:
                bad += 1
                problems.append(str(e))
        problems += [f"missing: {path}" for path in missing[:10]]
        report[name] = {"images": len(records), "captions": sum(len(r.captions) for r in records),
                        "missing": len(missing), "sampled": min(verify, len(present)), "undecodable": bad}
    return report, problems


def official_files(root: Path) -> list[str]:
    """Lines about the official captions_*.json files, when present (the Karpathy file does not need them)."""
    lines = []
    for path in sorted((root / "annotations").glob("captions_*.json")):
        try:
            source = read_coco(path, image_dir=root / path.stem.removeprefix("captions_"))
            lines.append(f"  {path.name}: {len(source)} captioned images")
        except DataError as e:
            lines.append(f"  {path.name}: {e}")
    return lines


def write_config(template: Path, out: Path, karpathy: Path, root: Path, skip: bool) -> None:
    """The template recipe with this machine's paths; validated by loading it back."""
    tree = yaml.safe_load(template.read_text())
    for name, split in SPLITS.items():
        tree["data"][name] = {"kind": "karpathy", "path": str(karpathy.resolve()), "image_dir": str(root.resolve()),
                              "split": split}
    if skip:
        tree["data"]["bad_data"] = "skip"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by scripts/prepare_coco.py from {template.name} for the COCO download in {root.resolve()}\n"
    out.write_text(header + yaml.safe_dump(tree, sort_keys=False))
    load_config(out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder with train2014/ and val2014/")
    parser.add_argument("--karpathy", help="dataset_coco.json (default: looked for under --root)")
    parser.add_argument("--out", default=str(ROOT / "configs" / "coco_local.yaml"), help="config file to write")
    parser.add_argument("--template", default=str(ROOT / "configs" / "coco_karpathy.yaml"), help="recipe to start from")
    parser.add_argument("--verify", type=int, default=200, help="images per split to decode as a check (0: none)")
    args = parser.parse_args(argv)
    try:
        root = Path(args.root).expanduser()
        if not root.is_dir():
            raise DataError(f"--root {root} is not a folder; give the folder holding train2014/ and val2014/")
        karpathy = find_karpathy(root, args.karpathy)
        report, problems = check(root, karpathy, args.verify)
        for name, counts in report.items():
            print(f"{name:5} ({SPLITS[name]}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print("\n".join(official_files(root)))
        for problem in problems[:20]:
            print(f"  {problem}")
        skip = any(c["missing"] or c["undecodable"] for c in report.values())
        write_config(Path(args.template), Path(args.out), karpathy, root, skip)
    except FrozenPrefixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skip:
        print("some images are missing or unreadable: the config skips them (data.bad_data: skip) and counts them")
    print(f"config written to {args.out}; train with: python -m frozen_prefix.train --config {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
