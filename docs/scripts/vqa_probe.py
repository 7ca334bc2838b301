"""A shapes VQA classifier without the LM, on a trained model's image features: what the task itself needs.

The frozen-LM recipes answer about two thirds of the shapes questions after ~16k training questions. This asks
how a small reader without the LM does: a 2-layer transformer reads the same 3 x 3 encoder cells that the prefix
is made from, plus the question as a bag of learned word embeddings, and picks the answer from the training
split's answer list. It trains on a stream of training questions and reports the test accuracy (the official VQA
accuracy, first `--questions` test items) after each number of steps in `--at`. `--encoder-lr` trains the encoder
with it; `--scene-cells` gives it the scenes' true contents per cell instead, a perfect encoder: what this reader
itself can learn in that many questions (docs/scripts/cell_readout.py asks what the features hold).

    python docs/scripts/vqa_probe.py --model runs/r9_s0/model --at 250 500 1000 2000 4000
    python docs/scripts/vqa_probe.py --scene-cells --at 250 500 1000 2000
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from frozen_prefix import FrozenPrefixCaptioner
from frozen_prefix.data.shapes import COLOURS, SHAPES
from frozen_prefix.data.shapes_vqa import FAMILIES, ShapesVQA, targets


def words(question: str) -> list[str]:
    """'What is to the left of the red circle?' -> ['what', 'is', ..., 'circle']."""
    return question.lower().rstrip("?").split()


class Probe(nn.Module):
    """[question] + k cells -> a 2-layer transformer -> answer logits read at the question's place."""

    def __init__(self, feature_dim: int, k: int, vocab: int, answers: int, width: int = 256) -> None:
        super().__init__()
        self.words = nn.EmbeddingBag(vocab, width, mode="mean")
        self.cells = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, width))
        self.places = nn.Parameter(torch.randn(k + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.mixer = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, answers))

    def forward(self, cells: torch.Tensor, word_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Cells (B, k, C) and the questions' word ids -> logits (B, answers)."""
        tokens = torch.cat([self.words(word_ids, offsets)[:, None], self.cells(cells)], dim=1) + self.places
        return self.head(self.mixer(tokens)[:, 0])


class Features:
    """The model's normalised 3 x 3 cells of each item's image, as its spatial projection reads them."""

    def __init__(self, model: FrozenPrefixCaptioner, trainable: bool = False) -> None:
        self.model, self.trainable = model, trainable
        for p in self.parameters():  # a model saved with model.freeze_encoder holds its encoder without gradients
            p.requires_grad_(trainable)

    def parameters(self) -> list[nn.Parameter]:
        """The encoder's and the feature norm's weights (what --encoder-lr trains)."""
        return [*self.model.encoder.parameters(), *self.model.projection.feature_norm.parameters()]

    def train(self, mode: bool) -> None:
        """Batch statistics while the encoder learns; the running ones to score."""
        self.model.encoder.train(mode and self.trainable)
        self.model.projection.feature_norm.train(mode and self.trainable)

    def __call__(self, items: list[dict]) -> torch.Tensor:
        pixels = self.model.pixel_values([item["image"] for item in items])
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.model.projection.pooled_cells(self.model.image_features(pixels)).float()


class SceneCells:
    """The ground truth as cells: each grid cell's colour and shape one-hot (all zero when empty): a perfect encoder."""

    trainable = False

    def parameters(self) -> list[nn.Parameter]:
        """Nothing to learn."""
        return []

    def train(self, mode: bool) -> None:
        """No state."""

    def __call__(self, items: list[dict]) -> torch.Tensor:
        cells = torch.zeros(len(items), 9, len(COLOURS) + len(SHAPES))
        for i, item in enumerate(items):
            for (colour, shape), (row, col) in zip(item["objects"], item["cells"], strict=True):
                cells[i, 3 * row + col, list(COLOURS).index(colour)] = 1.0
                cells[i, 3 * row + col, len(COLOURS) + SHAPES.index(shape)] = 1.0
        return cells


def encode_questions(items: list[dict], vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbeddingBag inputs: the concatenated word ids and each question's offset."""
    ids = [[vocab.get(w, 0) for w in words(item["question"])] for item in items]
    offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
    return torch.tensor([w for i in ids for w in i]), offsets


def main() -> None:
    """Train the probe on a stream of training questions and print the test accuracy at each checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder (its encoder is read; frozen unless --encoder-lr)")
    parser.add_argument("--scene-cells", action="store_true",
                        help="read the scene's true colour and shape per cell instead of a model's features")
    parser.add_argument("--at", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000], help="steps to report at")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--questions", type=int, default=300, help="test questions scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-lr", type=float, default=0.0,
                        help="train the encoder with the probe at this lr (0: the model's features stay frozen)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.scene_cells == (args.model is not None):
        parser.error("give --model or --scene-cells")
    if args.scene_cells and args.encoder_lr > 0:
        parser.error("--encoder-lr trains a model's encoder; --scene-cells has none")
    if args.scene_cells:
        features: Features | SceneCells = SceneCells()
    else:
        features = Features(FrozenPrefixCaptioner.from_pretrained(args.model).eval(), trainable=args.encoder_lr > 0)
    features.train(False)
    train, test = ShapesVQA("train"), ShapesVQA("test")
    answers = sorted({a for family in FAMILIES for a in targets(family, "train")})
    answer_id = {a: i for i, a in enumerate(answers)}
    vocab = {"<unk>": 0}
    for i in range(2000):  # every question template and word of the training split
        for w in words(train.question(i)["question"]):
            vocab.setdefault(w, len(vocab))
    test_items = [test[i] for i in range(args.questions)]

    def test_cells() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([features(test_items[i : i + 100]) for i in range(0, len(test_items), 100)])

    cells = test_cells()
    probe = Probe(cells.shape[-1], cells.shape[1], len(vocab), len(answers))
    groups = [{"params": probe.parameters(), "lr": args.lr}]
    if features.trainable:
        groups.append({"params": features.parameters(), "lr": args.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    start, step = time.perf_counter(), 0
    encoder = f"trained at lr {args.encoder_lr}" if features.trainable else "frozen"
    source = "the scenes' true cells" if args.scene_cells else f"model {args.model}, encoder {encoder}"
    print(f"{source}; {len(answers)} answers, {len(vocab)} words; batch {args.batch_size}")
    for target in sorted(args.at):
        probe.train()
        features.train(True)
        while step < target:
            draws = range(step * args.batch_size, (step + 1) * args.batch_size)
            items = [train[int(order[j % len(order)])] for j in draws]  # past 100k questions: a second epoch
            labels = torch.tensor([answer_id[item["answer"]] for item in items])
            loss = F.cross_entropy(probe(features(items), *encode_questions(items, vocab)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        probe.eval()
        features.train(False)
        cells = test_cells() if features.trainable else cells
        with torch.no_grad():
            predicted = probe(cells, *encode_questions(test_items, vocab)).argmax(-1).tolist()
        scores: dict[str, list[float]] = defaultdict(list)
        for item, p in zip(test_items, predicted, strict=True):
            scores[item["family"]].append(float(answers[p] == item["answer"]))
        overall = 100 * sum(sum(v) for v in scores.values()) / len(test_items)
        families = " ".join(f"{f} {100 * sum(v) / len(v):.0f}" for f, v in scores.items())
        print(f"steps {step:5d} ({step * args.batch_size:6d} questions): test {overall:5.1f} | {families} "
              f"| {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
