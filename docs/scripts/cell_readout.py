"""Whether a model's image features say what is drawn where: a linear readout of each grid cell's object.

The spatial prefix is made of the encoder's 3 x 3 cells, one per grid cell of a shapes scene. For each cell this
fits a linear classifier (its own weights) from the cell's normalised feature, as the projection reads it, to what
the scene holds there: one of the 28 colour-shape pairs, or nothing. The control reads each cell's object from the
next cell's feature instead (row-major, wrapping): if the features were not local, it would do as well.

    python docs/scripts/cell_readout.py --model runs/r9_s0/model --images 4000
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from frozen_prefix import FrozenPrefixCaptioner
from frozen_prefix.data.shapes import PAIRS, ShapesDataset, cell_labels, draw_objects

CLASSES = 1 + len(PAIRS)  # nothing, or one of the pairs (cell_labels)


@torch.no_grad()
def cells_and_contents(model: FrozenPrefixCaptioner, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n scenes of a shapes split: their cells (n, 9, C) and each cell's class (n, 9)."""
    data, features, contents = ShapesDataset(split), [], []
    for start in range(0, n, 100):
        scenes = [data.scene(i) for i in range(start, min(n, start + 100))]  # the objects and their generator
        pixels = model.pixel_values([draw_objects(objects, rng) for objects, rng in scenes])
        features.append(model.projection.pooled_cells(model.image_features(pixels)).float())
        contents.append(torch.tensor([cell_labels(objects) for objects, _ in scenes]))
    return torch.cat(features), torch.cat(contents)


def fit_readout(cells: torch.Tensor, contents: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear classifier per cell, full-batch Adam on the cross-entropy: weights (9, C, classes), bias."""
    weight = torch.zeros(cells.shape[1], cells.shape[2], CLASSES, requires_grad=True)
    bias = torch.zeros(cells.shape[1], CLASSES, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        logits = torch.einsum("bkc,kcn->bkn", cells, weight) + bias
        loss = F.cross_entropy(logits.flatten(0, 1), contents.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weight.detach(), bias.detach()


def main() -> None:
    """Fit the readout on training scenes and print its accuracy on the test split, with the next-cell control."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model folder with a spatial projection")
    parser.add_argument("--images", type=int, default=4000, help="training scenes the readout is fitted on")
    parser.add_argument("--test-images", type=int, default=500, help="test scenes the readout is scored on")
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps")
    args = parser.parse_args()
    model = FrozenPrefixCaptioner.from_pretrained(args.model).eval()
    if model.config.model.projection != "spatial" or model.prefix_length != 9:
        parser.error(f"{args.model} has no 3 x 3 spatial prefix (model.projection=spatial, prefix_length=9)")
    start = time.perf_counter()
    train_cells, train_contents = cells_and_contents(model, "train", args.images)
    test_cells, test_contents = cells_and_contents(model, "test", args.test_images)
    print(f"model {args.model}: {args.images} training and {args.test_images} test scenes, "
          f"{train_cells.shape[-1]} features a cell ({time.perf_counter() - start:.0f} s)")
    occupied = test_contents != 0
    for name, shift in (("its own cell", 0), ("the next cell (control)", 1)):
        # Reading cell i's object from cell i + shift's feature: roll the features back by `shift` cells.
        weight, bias = fit_readout(train_cells.roll(-shift, dims=1), train_contents, args.steps)
        predicted = (torch.einsum("bkc,kcn->bkn", test_cells.roll(-shift, dims=1), weight) + bias).argmax(-1)
        right = predicted == test_contents
        print(f"from {name:24s}: occupied cells {100 * right[occupied].float().mean():5.1f}%, "
              f"empty cells {100 * right[~occupied].float().mean():5.1f}%, "
              f"whole scenes {100 * right.all(1).float().mean():5.1f}%")


if __name__ == "__main__":
    main()
