"""The shapes task's own caption score: every object's colour and shape named, nothing more (and its parts)."""

from __future__ import annotations

from typing import Any

from ...data.shapes import match_parts

PARTS = ("count", "colours", "shapes")  # what is learned first: how many objects, then their colours, then shapes


class ShapesScorer:
    """Rows with "caption" and "objects" -> shapes_exact and shapes_count/colours/shapes, as fractions."""

    name = "shapes"

    def score(self, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Corpus fractions, and the rows with "exact" and "right" (the parts it gets right) added."""
        scored = []
        for row in rows:
            parts = match_parts(row["caption"], row["objects"])
            exact = parts.pop("exact")
            scored.append({**row, "exact": exact, "right": [name for name, ok in parts.items() if ok]})
        if not scored:
            return {}, scored
        metrics = {"shapes_exact": sum(r["exact"] for r in scored) / len(scored)}
        for part in PARTS:
            metrics[f"shapes_{part}"] = sum(part in r["right"] for r in scored) / len(scored)
        return metrics, scored
