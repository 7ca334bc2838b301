"""Whether a model's image features say what is drawn where: a linear readout of each grid cell's object.

The spatial prefix is made of the encoder's 3 x 3 cells, one per grid cell of a shapes scene. For each cell this
fits a linear classifier (its own weights) from the cell's normalised feature, as the projection reads it, to what
the scene holds there: one of the 28 colour-shape pairs, or nothing. The control reads each cell's object from the
next cell's feature instead (row-major, wrapping): if the features were not local, it would do as well.

The factored readout is the bound for the held-out compositions: two classifiers per cell, one for the colour and
one for the shape (each with "nothing"), fitted on the same training scenes, which never hold a held-out pair,
then scored on the cells of the compositional split that hold one. If the features keep colour and shape apart,
a pair never seen in training is read as well as a seen one.

    python docs/scripts/cell_readout.py --model runs/r9_s0/model --images 4000
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from frozen_prefix import FrozenPrefixCaptioner
from frozen_prefix.data.shapes import HELD_OUT, PAIRS, ShapesDataset, cell_labels, draw_objects

CLASSES = 1 + len(PAIRS)  # nothing, or one of the pairs (cell_labels)
HELD_OUT_CLASSES = {1 + PAIRS.index(pair) for pair in HELD_OUT}
COLOURS, SHAPES = sorted({c for c, _ in PAIRS}), sorted({s for _, s in PAIRS})
# Each class as (colour index, shape index), -1 for nothing: a pair label split into its colour and its shape.
PARTS = torch.tensor([(-1, -1)] + [(COLOURS.index(c), SHAPES.index(s)) for c, s in PAIRS])


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


def fit_readout(
    cells: torch.Tensor, contents: torch.Tensor, steps: int, classes: int = CLASSES
) -> tuple[torch.Tensor, torch.Tensor]:
    """One linear classifier per cell, full-batch Adam on the cross-entropy: weights (9, C, classes), bias."""
    weight = torch.zeros(cells.shape[1], cells.shape[2], classes, requires_grad=True)
    bias = torch.zeros(cells.shape[1], classes, requires_grad=True)
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
    parser.add_argument("--held-out-images", type=int, default=200, help="compositional scenes for the factored one")
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
        predicted = read(test_cells.roll(-shift, dims=1), weight, bias)
        right = predicted == test_contents
        part_right = PARTS[predicted] == PARTS[test_contents]  # (n, 9, 2); "nothing" matches no object's part
        colour_right, shape_right = part_right[..., 0], part_right[..., 1]
        print(f"from {name:24s}: occupied cells {100 * right[occupied].float().mean():5.1f}% "
              f"(colour {100 * colour_right[occupied].float().mean():5.1f}%, "
              f"shape {100 * shape_right[occupied].float().mean():5.1f}%), "
              f"empty cells {100 * right[~occupied].float().mean():5.1f}%, "
              f"whole scenes {100 * right.all(1).float().mean():5.1f}%")
    factored_readout(model, train_cells, train_contents, args)


def read(cells: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The class each cell's readout picks: (n, 9)."""
    return (torch.einsum("bkc,kcn->bkn", cells, weight) + bias).argmax(-1)


def factored_readout(model: FrozenPrefixCaptioner, cells: torch.Tensor, contents: torch.Tensor, args) -> None:
    """A colour and a shape classifier per cell, fitted on training scenes, scored on seen and held-out pairs."""
    held_cells, held_contents = cells_and_contents(model, "compositional", args.held_out_images)
    held_out = torch.isin(held_contents, torch.tensor(sorted(HELD_OUT_CLASSES)))
    seen = (held_contents != 0) & ~held_out
    # Class 0 is "nothing"; colour c is class 1 + c, shape s is class 1 + s.
    answers = {part: 1 + PARTS[contents][..., part] for part in (0, 1)}
    readouts = {part: fit_readout(cells, answers[part], args.steps, classes=1 + n)
                for part, n in ((0, len(COLOURS)), (1, len(SHAPES)))}
    right = {part: read(held_cells, *readouts[part]) == 1 + PARTS[held_contents][..., part] for part in (0, 1)}
    both = right[0] & right[1]
    for name, where in (("held-out pairs", held_out), ("seen pairs (same scenes)", seen)):
        print(f"factored, {name:24s}: colour {100 * right[0][where].float().mean():5.1f}%, "
              f"shape {100 * right[1][where].float().mean():5.1f}%, "
              f"both {100 * both[where].float().mean():5.1f}% ({int(where.sum())} cells)")


if __name__ == "__main__":
    main()
