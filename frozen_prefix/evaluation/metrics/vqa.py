"""The official VQAv2 accuracy: a port of GT-Vision-Lab/VQA's vqaEval.py (BSD licence), quirks included.

For one question with ground-truth answers g_1..g_n (n = 10 in VQAv2) and prediction p, the accuracy is
``mean_i min(1, #{j != i : g_j == p} / 3)``: each annotator's answer is left out in turn. Answers are
compared after the official normalisation (`normalize_answer`), but only when the ground-truth answers are
not all identical; when they are, prediction and answers are compared after whitespace fixes alone (so
"Yes" scores 0 against ten "yes"). Callers should give all 10 annotator answers; data with one answer per
question should repeat it 10 times, because with a single answer nothing is left after leaving it out and
every prediction scores 0.

Where Python 2 (which the official code runs on) and Python 3 differ, this follows Python 2: digit patterns match
ASCII digits only, and reported percentages are rounded half away from zero (`official_round`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

# The official contractions table, as "spelling=replacement" pairs in the official order. Entries with
# capitals (Im, Ive, Id've, I'dve) never match, because words are lower-cased first; "somebody'd" maps
# to "somebodyd" (the reverse of its neighbours). Both are kept: they are what the official code does.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=") for pair in _CONTRACTION_PAIRS.split())

# Number words become digits ("none" too); nothing above ten is mapped.
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Not in the list, so kept: apostrophes, colons, periods (handled by _PERIOD_STRIP), # $ % & * ~ ^ | and others.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# The official pattern. "(?!<=\d)" is a lookahead for the text "<=" + digit (a mistyped lookbehind), which never
# matches at a period, so the pattern removes every period that is not followed by a digit ("3." -> "3", "a.b" ->
# "ab", "1.5" stays). re.ASCII: Python 2 str patterns match only ASCII digits with \d.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# The official code passes re.UNICODE (32) where re.sub takes its count: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = 32  # the value of re.UNICODE
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)


def clean_whitespace(text: str) -> str:
    """Tabs and newlines to spaces, then strip: the only fix applied to every answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official processPunctuation: drop or blank out punctuation marks, then strip periods."""
    # Both tests look at the text as given, not as partly processed: a digit-comma-digit anywhere ("1,000")
    # makes every mark vanish ("red-white" -> "redwhite") instead of becoming a space.
    digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if spaced or digit_comma else " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official processDigitArticle: lower-case, number words to digits, drop articles, add apostrophes."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The full official normalisation: whitespace, punctuation, then digits, articles and contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """One question's official accuracy in [0, 1]: leave-one-out min(1, matches / 3), averaged over the answers."""
    if not answers:
        raise ValueError(
            "VQA accuracy needs the ground-truth answers of the question (10 in VQAv2), got none; "
            "unanswered questions (test-dev) are scored by the official evaluation server"
        )
    truths = [clean_whitespace(answer) for answer in answers]
    guess = clean_whitespace(prediction)
    if len(set(truths)) > 1:  # the official quirk: identical answers are compared without normalisation
        truths = [process_digit_article(process_punctuation(truth)) for truth in truths]
        guess = process_digit_article(process_punctuation(guess))
    matches = sum(truth == guess for truth in truths)
    # Leaving answer i out removes exactly one entry (VQAv2 answers carry distinct answer_ids), itself.
    per_answer = [min(1, (matches - (truth == guess)) / 3) for truth in truths]
    return float(sum(per_answer)) / len(per_answer)


def official_round(value: float, digits: int = 2) -> float:
    """Python 2's round(), which the official evaluator runs on: exact binary value, halves away from zero."""
    # Python 3's round() goes to even: round(0.125, 2) is 0.12 there and 0.13 in the official numbers.
    step = Decimal(1).scaleb(-digits)
    return float(Decimal(value).quantize(step, rounding=ROUND_HALF_UP))


def _percent(scores: list[float]) -> float:
    """The official average: 100 * sum / count (in that order, as floats), rounded to 2 decimals."""
    return official_round(100 * float(sum(scores)) / len(scores), 2)


def _by_key(rows: list[dict[str, Any]], scores: list[float], key: str) -> dict[str, list[float]]:
    """Scores grouped by a row field, in order of first appearance; rows without the field are left out."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row, score in zip(rows, scores):
        if row.get(key) is not None:
            groups[row[key]].append(score)
    return groups


def vqa_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The official result: {"overall", "perQuestionType", "perAnswerType"} in percent with 2 decimals.

    Each row has "prediction" and "answers", and optionally "question_type" and "answer_type".
    """
    if not rows:
        raise ValueError("vqa_report needs at least one row with a prediction and its answers")
    scores = [vqa_accuracy(row["prediction"], row["answers"]) for row in rows]
    return {
        "overall": _percent(scores),
        "perQuestionType": {k: _percent(v) for k, v in _by_key(rows, scores, "question_type").items()},
        "perAnswerType": {k: _percent(v) for k, v in _by_key(rows, scores, "answer_type").items()},
    }


def _score_row(row: dict[str, Any]) -> float:
    """One row's accuracy; an error names the question."""
    try:
        return vqa_accuracy(row["prediction"], row["answers"])
    except ValueError as e:
        raise ValueError(f"question {row.get('question_id', '?')}: {e}") from e


def _group_keys(row: dict[str, Any]) -> set[str]:
    """The metric names a row counts towards besides the overall accuracy."""
    keys = set()
    if row.get("answer_type") is not None:
        keys.add(f"vqa_accuracy/{row['answer_type']}")
    if row.get("family") is not None:
        keys.add(f"vqa_accuracy/{row['family']}")
    if row.get("question_type") is not None:
        keys.add(f"vqa_accuracy/q:{row['question_type']}")
    return keys


class VQAScorer:
    """VQA accuracy behind the library's scorer interface: fractions in [0, 1], not the official percent."""

    name = "vqa"

    def score(self, rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Corpus metrics (vqa_accuracy, per answer type / family / q:question type, questions) and scored rows."""
        scored = [{**row, "normalized": normalize_answer(row["prediction"]), "score": _score_row(row)} for row in rows]
        metrics: dict[str, float] = {}
        if scored:
            metrics["vqa_accuracy"] = _mean([row["score"] for row in scored])
        groups: dict[str, list[float]] = defaultdict(list)
        for row in scored:
            for key in _group_keys(row):
                groups[key].append(row["score"])
        metrics.update({key: _mean(groups[key]) for key in sorted(groups)})
        metrics["questions"] = len(scored)
        return metrics, scored


def _mean(scores: list[float]) -> float:
    """A plain average, summed in order as the official code does."""
    return float(sum(scores)) / len(scores)
