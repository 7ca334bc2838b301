"""How fast can an encoder learn to see the shapes at all? Direct supervision, no LM: a calibration for recipes.

    python docs/scripts/probe_encoder.py --encoder resnet10t --image-size 96 --lr 3e-3 --steps 300 --batch-size 16

Trains a timm encoder from scratch with a linear head on the 3x3 cells of its feature map: each cell is
classified as empty or one of the colour-shape pairs (the shapes grid is 3x3). Every --every steps it
prints, on test images, the fraction of objects and of whole images classified right. This is an
upper bound on what the captioning loss can teach the same encoder in the same number of images: the
LM path gives a noisier signal about the same facts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from frozen_prefix.data.shapes import PAIRS, ShapesDataset, cell_labels, draw_objects  # noqa: E402
from frozen_prefix.models.encoder import build_transform  # noqa: E402


def cells_batch(data: ShapesDataset, indices: range, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, per-cell labels): label 0 is an empty cell, 1 + i the colour-shape pair PAIRS[i]."""
    images, labels = [], []
    for index in indices:
        objects, rng = data.scene(index)  # the objects with their grid cells, and the generator that draws them
        images.append(transform(draw_objects(objects, rng)))
        labels.append(torch.tensor(cell_labels(objects)))
    return torch.stack(images), torch.stack(labels)


def cell_logits(encoder: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 9, classes): the feature map average-pooled to the 3x3 grid, one prediction per cell."""
    cells = F.adaptive_avg_pool2d(encoder.forward_features(images), 3)
    return head(cells.flatten(2).transpose(1, 2))


def main() -> None:
    """Parse arguments, train, print accuracy as it goes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--test-images", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    size = args.image_size
    data_config = {"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0}
    transform = build_transform(data_config)  # the recipe's own eval transform: resize, normalise
    train, test = ShapesDataset("train"), ShapesDataset("test")
    test_images, test_labels = cells_batch(test, range(args.test_images), transform)
    encoder = timm.create_model(args.encoder, pretrained=False, num_classes=0)
    head = nn.Linear(encoder.num_features, 1 + len(PAIRS))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=args.lr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = cells_batch(train, range((step - 1) * args.batch_size, step * args.batch_size), transform)
        loss = F.cross_entropy(cell_logits(encoder, head, images).flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            encoder.eval()
            with torch.no_grad():
                predicted = cell_logits(encoder, head, test_images).argmax(-1)
            encoder.train()
            occupied = test_labels > 0
            objects = (predicted[occupied] == test_labels[occupied]).float().mean().item()
            whole = (predicted == test_labels).all(1).float().mean().item()
            print(
                f"{args.encoder} {size}px lr {args.lr:g} step {step} ({step * args.batch_size} images): "
                f"objects {objects:.3f}  images {whole:.3f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
