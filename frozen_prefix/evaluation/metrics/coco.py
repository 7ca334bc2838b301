"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr, and SPICE when it can run."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import FrozenPrefixError

log = logging.getLogger(__name__)


def java_available() -> bool:
    """METEOR and the PTB tokenizer run on Java."""
    return shutil.which("java") is not None


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None: it needs Java and Stanford CoreNLP, which pycocoevalcap downloads."""
    if not java_available():
        return "SPICE not computed: it needs Java; the other metrics are reported"
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    if not all((lib / f"stanford-corenlp-3.6.0{suffix}.jar").is_file() for suffix in ("", "-models")):
        return (
            "SPICE not computed: it needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use "
            "(not possible offline); the other metrics are reported"
        )
    return None


_METEOR: Any = None  # one METEOR JVM per process: starting it takes about 10 s
_SPICE_NOTED = False


def _meteor() -> Any:
    """The process's METEOR scorer, (re)started when needed."""
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


@contextlib.contextmanager
def _quiet_fd(fd: int) -> Iterator[None]:
    """Silence a file descriptor: the Java tokenizer prints progress lines straight to the process's stderr."""
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def coco_scores(
    predictions: dict[Any, str], references: dict[Any, list[str]], spice: bool = True
) -> tuple[dict[str, float], dict[Any, dict[str, float]]]:
    """Corpus and per-image BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE when it can run), exactly as pycocoevalcap gives.

    Captions go through pycocoevalcap's PTB tokenizer, then its scorers; scores stay on their own 0-1 scale.
    """
    global _SPICE_NOTED
    if not java_available():
        raise FrozenPrefixError(
            "caption metrics need Java (PTB tokenizer, METEOR); install a JRE or set eval.metrics=false"
        )
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise FrozenPrefixError(f"image {missing[0]!r} has no reference captions; every scored image needs one")
    tokenizer = PTBTokenizer()
    with _quiet_fd(2):
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    corpus: dict[str, float] = {}
    per_image: dict[Any, dict[str, float]] = {i: {} for i in ids}

    def add(name: str, score: Any, scores: Any) -> None:
        corpus[name] = float(score)
        for i, value in zip(gts.keys(), scores, strict=True):  # scorers walk gts.keys() in order
            per_image[i][name] = float(value)

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        add(f"bleu{n + 1}", bleu[n], bleu_each[n])
    try:
        add("meteor", *_meteor().compute_score(gts, res))
    except (OSError, ValueError, RuntimeError):  # a JVM that died or answered garbage
        global _METEOR
        _METEOR = None  # a half-read METEOR pipe cannot be reused
        raise
    add("rouge_l", *Rouge().compute_score(gts, res))
    add("cider", *Cider().compute_score(gts, res))
    reason = spice_unavailable() if spice else None
    if spice and reason is None:
        from pycocoevalcap.spice.spice import Spice

        try:
            with _quiet_fd(2):
                score, scores = Spice().compute_score(gts, res)
            add("spice", score, [s["All"]["f"] for s in scores])
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            first = (str(e).splitlines() or [""])[0][:100]
            reason = f"SPICE not computed: it failed ({type(e).__name__}: {first}); the other metrics are reported"
    if reason is not None and spice and not _SPICE_NOTED:
        log.warning(reason)
        _SPICE_NOTED = True
    return corpus, per_image


def coco_metrics(predictions: dict[Any, str], references: dict[Any, list[str]], spice: bool = True) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when it can run), as pycocoevalcap's scorers give them."""
    return coco_scores(predictions, references, spice)[0]


class CocoScorer:
    """Rows with "image_id", "caption" and "references" -> corpus and per-image COCO metrics."""

    name = "coco"

    def __init__(self, spice: bool = True) -> None:
        self.spice = spice

    def score(self, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Corpus metrics, and the rows with their per-image scores added."""
        if not rows:
            return {}, rows
        corpus, per_image = coco_scores(
            {r["image_id"]: r["caption"] for r in rows}, {r["image_id"]: r["references"] for r in rows}, self.spice
        )
        return corpus, [{**r, **per_image[r["image_id"]]} for r in rows]
