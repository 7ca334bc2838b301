"""Fast concept binding accuracy (Frozen's open-ended miniImageNet): is the query's nonsense name the answer?"""

from __future__ import annotations

import string
from typing import Any

_STRIP = string.punctuation + "\u201c\u201d\u2018\u2019"


def first_word(text: str) -> str:
    """The first word, lowercased, without surrounding punctuation: ' Dax.' -> 'dax', 'blicket, a' -> 'blicket'."""
    for word in text.split():
        word = word.strip(_STRIP).lower()
        if word:
            return word
    return ""


def is_correct(row: dict[str, Any]) -> bool:
    """Open-ended: the prediction's first word is the name; closed: the best-scored candidate is the name."""
    answer = first_word(str(row["answer"]))
    if "candidate_scores" in row:
        scores = row["candidate_scores"]
        if not scores:
            return False
        best = max(scores, key=lambda name: scores[name])
        return first_word(str(best)) == answer
    if "prediction" in row:
        return first_word(str(row["prediction"])) == answer
    raise KeyError("a binding row needs 'prediction' (generated text) or 'candidate_scores' (name -> log-likelihood)")


class BindingScorer:
    """Rows with "answer" and "prediction" or "candidate_scores" -> binding_accuracy, episodes, chance."""

    name = "binding"

    def score(self, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Corpus accuracy (and chance, when rows list their names), and the rows with "correct" and "score"."""
        scored = []
        for row in rows:
            correct = is_correct(row)
            scored.append({**row, "correct": correct, "score": int(correct)})
        if not scored:
            return {}, scored
        metrics = {"binding_accuracy": sum(r["score"] for r in scored) / len(scored), "episodes": len(scored)}
        if all(r.get("names") for r in scored):
            # Chance is guessing among the episode's names: 1/ways, averaged when ways differ.
            metrics["chance"] = sum(1 / len(r["names"]) for r in scored) / len(scored)
        return metrics, scored
