"""Every scorer behind one interface: `scorer.score(rows) -> (corpus metrics, rows with per-example scores)`.

Rows are plain dicts (one per image, question or episode) that the evaluation loops build and write to
per-example JSON Lines; a scorer reads the keys it needs and adds its own. Metrics are "higher is better".
"""

from __future__ import annotations

from typing import Any, Protocol

from .coco import CocoScorer, coco_metrics, coco_scores, spice_unavailable
from .shapes import ShapesScorer


class Scorer(Protocol):
    """Scores a list of rows: corpus metrics, and the rows with per-example scores added."""

    name: str

    def score(self, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]: ...


def apply_scorers(
    scorers: list[Scorer], rows: list[dict[str, Any]]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run scorers one after another; their metrics merge, and each adds its keys to the rows."""
    metrics: dict[str, float] = {}
    for scorer in scorers:
        corpus, rows = scorer.score(rows)
        metrics.update(corpus)
    return metrics, rows


__all__ = [
    "CocoScorer", "Scorer", "ShapesScorer", "apply_scorers", "coco_metrics", "coco_scores", "spice_unavailable",
]
