"""VQA accuracy against a copy of the official evaluator, and the VQA data sources."""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from frozen_prefix.data.vqa import read_vqa_jsonl, read_vqav2
from frozen_prefix.errors import DataError
from frozen_prefix.evaluation.metrics import vqa as vqa_metrics
from frozen_prefix.evaluation.metrics.vqa import VQAScorer, normalize_answer, official_round, vqa_accuracy, vqa_report

FIXTURES = Path(__file__).parents[1] / "fixtures" / "vqa"
CASES = [json.loads(line) for line in (FIXTURES / "scoring_cases.jsonl").read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Test oracle: the scoring logic of vqaEval.py from GT-Vision-Lab/VQA (PythonEvaluationTools/vqaEvaluation,
# commit a013f00 "Fixed processing answers bug"), adapted lightly to run here as a reference. Adaptations: Python 3
# (no print statements, no progress bar); plain dicts in place of the VQA/result objects; the unrounded per-question
# accuracy kept in rawQA; re.ASCII, because Python 2 str patterns match only ASCII digits with \d; and round()
# replaced by py2_round, because Python 3 rounds halves to even where Python 2 rounds them away from zero.
#
# Copyright (c) 2014, Aishwarya Agrawal. All rights reserved.
# Redistribution and use in source and binary forms, with or without modification, are permitted provided that the
# following conditions are met: 1. Redistributions of source code must retain the above copyright notice, this list
# of conditions and the following disclaimer. 2. Redistributions in binary form must reproduce the above copyright
# notice, this list of conditions and the following disclaimer in the documentation and/or other materials provided
# with the distribution. THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS
# OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
# PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE FOR ANY DIRECT,
# INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
# SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY
# THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN
# ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.


def py2_round(x, n=0):
    """Python 2.7's round(): the float's exact value, halves away from zero (written independently of ours)."""
    scaled = abs(Fraction(x)) * 10**n
    return math.copysign(float(Fraction(math.floor(scaled + Fraction(1, 2)), 10**n)), x)


class OfficialVQAEval:
    def __init__(self, gts, res, n=2):
        # gts: {quesId: {"answers": [{"answer", "answer_confidence", "answer_id"}], "question_type", "answer_type"}}
        # res: {quesId: {"answer": prediction}}
        self.n = n
        self.accuracy = {}
        self.evalQA = {}
        self.rawQA = {}
        self.evalQuesType = {}
        self.evalAnsType = {}
        self.gts = gts
        self.res = res
        self.params = {"question_id": list(gts)}
        self.contractions = {
            'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
            "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
            'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
            'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's",
            'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
            'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll",
            "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
            "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
            'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
            "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've",
            "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
            "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
            "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
            'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've",
            "someone'dve": "someone'd've", 'someonell': "someone'll", 'someones': "someone's",
            'somethingd': "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
            'somethingll': "something'll", 'thats': "that's", 'thered': "there'd", "thered've": "there'd've",
            "there'dve": "there'd've", 'therere': "there're", 'theres': "there's", 'theyd': "they'd",
            "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
            'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
            'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's",
            'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've",
            'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's",
            'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't",
            'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
            'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
            "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've",
            "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
        }
        self.manualMap = {
            "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10",
        }
        self.articles = ["a", "an", "the"]
        self.periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
        self.commaStrip = re.compile(r"(\d)(\,)(\d)", re.ASCII)
        self.punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                      "?", "!"]

    def evaluate(self, quesIds=None):
        if quesIds is None:
            quesIds = [quesId for quesId in self.params["question_id"]]
        gts = {}
        res = {}
        for quesId in quesIds:
            gts[quesId] = self.gts[quesId]
            res[quesId] = self.res[quesId]
        accQA = []
        accQuesType = {}
        accAnsType = {}
        for quesId in quesIds:
            for ansDic in gts[quesId]["answers"]:
                ansDic["answer"] = ansDic["answer"].replace("\n", " ")
                ansDic["answer"] = ansDic["answer"].replace("\t", " ")
                ansDic["answer"] = ansDic["answer"].strip()
            resAns = res[quesId]["answer"]
            resAns = resAns.replace("\n", " ")
            resAns = resAns.replace("\t", " ")
            resAns = resAns.strip()
            gtAcc = []
            gtAnswers = [ans["answer"] for ans in gts[quesId]["answers"]]

            if len(set(gtAnswers)) > 1:
                for ansDic in gts[quesId]["answers"]:
                    ansDic["answer"] = self.processPunctuation(ansDic["answer"])
                    ansDic["answer"] = self.processDigitArticle(ansDic["answer"])
                resAns = self.processPunctuation(resAns)
                resAns = self.processDigitArticle(resAns)

            for gtAnsDatum in gts[quesId]["answers"]:
                otherGTAns = [item for item in gts[quesId]["answers"] if item != gtAnsDatum]
                matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
                acc = min(1, float(len(matchingAns)) / 3)
                gtAcc.append(acc)
            quesType = gts[quesId]["question_type"]
            ansType = gts[quesId]["answer_type"]
            avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
            accQA.append(avgGTAcc)
            if quesType not in accQuesType:
                accQuesType[quesType] = []
            accQuesType[quesType].append(avgGTAcc)
            if ansType not in accAnsType:
                accAnsType[ansType] = []
            accAnsType[ansType].append(avgGTAcc)
            self.rawQA[quesId] = avgGTAcc
            self.setEvalQA(quesId, avgGTAcc)
        self.setAccuracy(accQA, accQuesType, accAnsType)

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        outText = self.periodStrip.sub("", outText, re.UNICODE)  # sic: re.UNICODE (32) lands in `count`
        return outText

    def processDigitArticle(self, inText):
        outText = []
        tempText = inText.lower().split()
        for word in tempText:
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
            else:
                pass
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        outText = " ".join(outText)
        return outText

    def setAccuracy(self, accQA, accQuesType, accAnsType):
        self.accuracy["overall"] = py2_round(100 * float(sum(accQA)) / len(accQA), self.n)
        self.accuracy["perQuestionType"] = {
            quesType: py2_round(100 * float(sum(accQuesType[quesType])) / len(accQuesType[quesType]), self.n)
            for quesType in accQuesType
        }
        self.accuracy["perAnswerType"] = {
            ansType: py2_round(100 * float(sum(accAnsType[ansType])) / len(accAnsType[ansType]), self.n)
            for ansType in accAnsType
        }

    def setEvalQA(self, quesId, acc):
        self.evalQA[quesId] = py2_round(100 * acc, self.n)


# End of the adapted official code.
# ----------------------------------------------------------------------------------------------------------------


def official_eval(rows):
    """Run the oracle on rows shaped like ours; question ids are the row positions."""
    gts = {
        i: {
            # distinct answer_ids, as in the official annotations: leave-one-out removes exactly one answer
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(r["answers"])
            ],
            "question_type": r.get("question_type"),
            "answer_type": r.get("answer_type"),
        }
        for i, r in enumerate(rows)
    }
    res = {i: {"answer": r["prediction"]} for i, r in enumerate(rows)}
    evaluator = OfficialVQAEval(copy.deepcopy(gts), res)
    evaluator.evaluate()
    return evaluator


def official_normalize(text):
    """The oracle's processing of a prediction in the varied-answers branch."""
    oracle = OfficialVQAEval({}, {})
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return oracle.processDigitArticle(oracle.processPunctuation(text))


# ---------------------------------------------------------------- the metric against the official code


def test_tables_match_the_official_ones():
    oracle = OfficialVQAEval({}, {})
    assert vqa_metrics.CONTRACTIONS == oracle.contractions
    assert list(vqa_metrics.CONTRACTIONS) == list(oracle.contractions)  # same order too
    assert vqa_metrics.NUMBER_WORDS == oracle.manualMap
    assert vqa_metrics.ARTICLES == set(oracle.articles)
    assert list(vqa_metrics.PUNCTUATION) == oracle.punct
    assert vqa_metrics._PERIOD_STRIP.pattern == oracle.periodStrip.pattern
    assert vqa_metrics._COMMA_STRIP.pattern.replace("\\,", ",") == oracle.commaStrip.pattern.replace("\\,", ",")
    assert vqa_metrics._PERIOD_STRIP_COUNT == re.UNICODE


@pytest.mark.parametrize("case", CASES, ids=[c["note"] for c in CASES])
def test_each_question_matches_the_official_code(case):
    oracle = official_eval([case])
    ours = vqa_accuracy(case["prediction"], case["answers"])
    assert ours == oracle.rawQA[0]  # bit for bit, not approximately
    assert official_round(100 * ours) == oracle.evalQA[0]


def test_fixture_covers_every_outcome():
    scores = {vqa_accuracy(c["prediction"], c["answers"]) for c in CASES}
    assert len(CASES) >= 30
    assert {0.0, 1.0, 0.3, 0.6, 0.9} <= {round(s, 10) for s in scores}


def test_report_matches_the_official_code():
    assert vqa_report(CASES) == official_eval(CASES).accuracy


def test_report_format():
    report = vqa_report(CASES)
    assert set(report) == {"overall", "perQuestionType", "perAnswerType"}
    assert set(report["perAnswerType"]) == {"yes/no", "number", "other"}
    assert report["perQuestionType"]["what color is the"] == official_eval(
        [c for c in CASES if c["question_type"] == "what color is the"]
    ).accuracy["overall"]
    for value in [report["overall"], *report["perQuestionType"].values(), *report["perAnswerType"].values()]:
        assert 0 <= value <= 100 and value == round(value, 2)


def _random_answer(rng):
    """A short answer built from tokens that exercise every rule."""
    tokens = ["yes", "Yes", "no", "a", "an", "The", "dog", "two", "2", "none", "1,000", "3.5", "3.", "dont", "don't",
              "it's", "Im", "red-white", "red", "-", "/", "(x)", "?", "!", ",", ".", "..", "\n", "\t", " ", "12:30",
              "somebody'd", "yall'll", "ten", "10", "#", "a.b", "x,y", "1,2", "@home", "\"q\"", "[b]", "c+d"]
    return "".join(rng.choice(tokens) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(1, 4)))


def test_random_answers_match_the_official_code():
    rng = random.Random(0)
    for _ in range(2000):
        text = _random_answer(rng)
        assert normalize_answer(text) == official_normalize(text), repr(text)
    rows = []
    for _ in range(300):
        pool = [_random_answer(rng) for _ in range(rng.randint(1, 3))]
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + [_random_answer(rng)])
        rows.append({"prediction": prediction, "answers": answers, "question_type": rng.choice("ab"),
                     "answer_type": rng.choice("xyz")})
    oracle = official_eval(rows)
    assert [vqa_accuracy(r["prediction"], r["answers"]) for r in rows] == [oracle.rawQA[i] for i in range(len(rows))]
    assert vqa_report(rows) == oracle.accuracy


# ---------------------------------------------------------------- values checked by hand


def test_leave_one_out_by_hand():
    # 2 of 10 annotators said "red". Leaving out one of those two leaves 1 match: min(1, 1/3) = 1/3 (twice);
    # leaving out one of the eight others leaves 2 matches: 2/3 (eight times). (2/3 + 16/3) / 10 = 6/10 = 0.6.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 1 of 10: 0 for itself, 1/3 for the nine others: 3/10.  3 of 10: 2/3 three times and 1 seven times: 9/10.
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_identical_answers_are_not_normalised():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is always fixed
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # the official quirk
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0  # varied answers: normalised


def test_few_answers():
    # One answer: nothing is left once it is left out, so even an exact match scores 0 (give 10 answers).
    assert vqa_accuracy("dog", ["dog"]) == 0.0
    assert vqa_accuracy("dog", ["dog"] * 10) == 1.0
    # Three identical answers: each leaves 2 matches: 2/3.
    assert vqa_accuracy("dog", ["dog"] * 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ground-truth answers"):
        vqa_accuracy("dog", [])


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("Yes.", "yes"),
        ("  two Dogs \n", "2 dogs"),
        ("The Dog", "dog"),
        ("dont", "don't"),
        ("its", "its"),
        ("1,000", "1000"),
        ("red-white", "red white"),
        ("red - white", "red white"),
        ("1,000 red-white", "1000 redwhite"),  # a digit-comma-digit deletes every mark
        ("3.5", "3.5"),
        ("3. a.b", "3 ab"),
        ("12:30", "12:30"),
        ("Im", "im"),  # the table's "Im" never matches lower-cased text
        ("somebody'd", "somebodyd"),
        ("." * 40, "." * 8),  # only 32 periods are removed
        ("\u0661,\u0662", "\u0661 \u0662"),  # Arabic-Indic digits are not \d in Python 2: the comma becomes a space
    ],
)
def test_normalize_answer_by_hand(text, normalized):
    assert normalize_answer(text) == normalized


def test_official_round_is_python_2s():
    assert official_round(0.125) == 0.13  # Python 3's round gives 0.12
    assert official_round(2.675) == 2.67  # 2.675 is 2.67499999... in binary
    assert official_round(2.5, 0) == 3.0 and official_round(0.5, 0) == 1.0
    assert official_round(33.33333333) == 33.33
    # 1 right out of 800: 100 * 1 / 800 = 0.125 exactly, reported as 0.13 by the official code.
    rows = [{"prediction": "yes" if i == 0 else "no", "answers": ["yes"] * 10} for i in range(800)]
    assert vqa_report(rows)["overall"] == 0.13 == official_eval(rows).accuracy["overall"]


def test_report_needs_rows():
    with pytest.raises(ValueError, match="at least one row"):
        vqa_report([])


# ---------------------------------------------------------------- the scorer interface


def test_scorer_metrics_and_rows():
    metrics, rows = VQAScorer().score(CASES)
    assert VQAScorer.name == "vqa"
    scores = [vqa_accuracy(c["prediction"], c["answers"]) for c in CASES]
    assert metrics["questions"] == len(CASES)
    assert metrics["vqa_accuracy"] == pytest.approx(sum(scores) / len(scores))
    assert official_round(100 * metrics["vqa_accuracy"]) == vqa_report(CASES)["overall"]
    report = vqa_report(CASES)
    for answer_type, percent in report["perAnswerType"].items():
        assert official_round(100 * metrics[f"vqa_accuracy/{answer_type}"]) == percent
    for question_type, percent in report["perQuestionType"].items():
        assert official_round(100 * metrics[f"vqa_accuracy/q:{question_type}"]) == percent
    assert all(0 <= v <= 1 for k, v in metrics.items() if k != "questions")
    assert [r["score"] for r in rows] == scores
    assert rows[1]["normalized"] == "yes" and rows[1]["score"] == 0.0  # "Yes" against ten "yes"
    assert rows[0]["note"] == CASES[0]["note"]  # other fields are kept
    assert "score" not in CASES[0]  # the input rows are not changed


def test_scorer_families():
    rows = [
        {"prediction": "2", "answers": ["2"] * 10, "family": "count"},
        {"prediction": "3", "answers": ["2"] * 10, "family": "count"},
        {"prediction": "red", "answers": ["red"] * 10, "family": "colour"},
    ]
    metrics, _ = VQAScorer().score(rows)
    assert metrics == {"vqa_accuracy": pytest.approx(2 / 3), "vqa_accuracy/colour": 1.0, "vqa_accuracy/count": 0.5,
                       "questions": 3}


def test_scorer_names_a_question_without_answers():
    with pytest.raises(ValueError, match="question 17"):
        VQAScorer().score([{"prediction": "x", "answers": [], "question_id": 17}])
    assert VQAScorer().score([]) == ({"questions": 0}, [])


# ---------------------------------------------------------------- data sources


def _png(path, colour=(200, 30, 30)):
    """A tiny image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), colour).save(path)
    return path


def _write_jsonl(path, objects):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects), encoding="utf-8")
    return path


def test_read_vqa_jsonl(tmp_path):
    _png(tmp_path / "data" / "imgs" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png", (0, 0, 255))
    path = _write_jsonl(tmp_path / "data" / "vqa.jsonl", [
        {"image": "imgs/a.png", "question": " What colour? ", "answers": ["red"] * 9 + ["pink"],
         "question_id": 7, "question_type": "what color", "answer_type": "other", "image_id": "a"},
        "",
        {"image": str(absolute), "question": "Is it blue?", "answer": "yes"},
    ])
    data = read_vqa_jsonl(path)
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first["image"].mode == "RGB" and first["image"].getpixel((0, 0)) == (200, 30, 30)
    assert {k: v for k, v in first.items() if k != "image"} == {
        "question": "What colour?", "answers": ["red"] * 9 + ["pink"], "question_id": 7, "image_id": "a",
        "question_type": "what color", "answer_type": "other",
    }
    assert second["image"].getpixel((0, 0)) == (0, 0, 255)
    assert second["answers"] == ["yes"] * 10  # one answer counts as ten annotators giving it
    assert second["question_id"] == 3 and second["image_id"] == str(absolute)  # defaults: line number, image
    assert second["question_type"] is None and second["answer_type"] is None
    assert data.image_key(0) == str(tmp_path / "data" / "imgs" / "a.png")
    assert data.without_image(1)["answers"] == ["yes"] * 10
    assert len(read_vqa_jsonl(path, size=1)) == 1


def test_jsonl_images_are_read_on_access(tmp_path):
    image = _png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q?", "answers": ["x"]}])
    data = read_vqa_jsonl(path)
    image.unlink()  # reading the file did not open the image; keys and fields need no image either
    assert data.image_key(0) == str(image)
    assert data.without_image(0)["question"] == "q?"
    with pytest.raises(DataError) as error:
        data[0]
    message = str(error.value)
    assert "\n" not in message and f"{path}:1" in message and str(image) in message
    assert isinstance(error.value.__cause__, DataError)


def test_jsonl_malformed_line(tmp_path):
    path = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "q", "answers": []}, '{"image": "b.p'])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid JSON")) as error:
        read_vqa_jsonl(path)
    assert "\n" not in str(error.value) and isinstance(error.value.__cause__, json.JSONDecodeError)
    path = _write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: each line must be a JSON object")):
        read_vqa_jsonl(path)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"question": "", "answers": ["x"]}, '"question" must be a non-empty string'),
        ({"answers": ["x"]}, '"question" must be a non-empty string'),
        ({"question": "q", "answers": "x"}, '"answers" must be a list of strings'),
        ({"question": "q", "answers": [1, 2]}, '"answers" must be a list of strings'),
    ],
)
def test_jsonl_bad_fields_name_the_line(tmp_path, fields, problem):
    _png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "vqa.jsonl", [{"image": "a.png", "question": "ok", "answers": ["x"]},
                                                 {"image": "a.png", **fields}])
    data = read_vqa_jsonl(path)
    assert data[0]["question"] == "ok"
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {problem}")):
        data[1]


def test_jsonl_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_vqa_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no questions"):
        read_vqa_jsonl(_write_jsonl(tmp_path / "empty.jsonl", [""]))
    path = _write_jsonl(tmp_path / "noimage.jsonl", [{"question": "q", "answers": ["x"]}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no image")):
        read_vqa_jsonl(path)[0]


@pytest.fixture
def vqav2(tmp_path):
    """The VQAv2-format fixture files next to an image folder with COCO 2014 names (image 25: bare 2017 name)."""
    for name in ("v2_questions.json", "v2_annotations.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    _png(tmp_path / "val2014" / "COCO_val2014_000000000009.jpg", (10, 200, 10))
    _png(tmp_path / "val2014" / "000000000025.jpg", (10, 10, 200))
    return tmp_path


def test_read_vqav2(vqav2, monkeypatch):
    monkeypatch.chdir(vqav2.parent)  # image_dir is found next to the questions file too
    data = read_vqav2(vqav2 / "v2_questions.json", vqav2 / "v2_annotations.json", "val2014")
    assert len(data) == 3
    item = data[0]
    assert item["image"].mode == "RGB" and item["image"].getpixel((0, 0))[1] > 150  # JPEG: colours are close
    assert {k: v for k, v in item.items() if k != "image"} == {
        "question": "What color is the ball?", "answers": ["red"] * 8 + ["orange"] * 2, "question_id": 9000,
        "image_id": "9", "question_type": "what color is the", "answer_type": "other",
    }
    assert data.image_key(0) == data.image_key(1) == str(vqav2 / "val2014" / "COCO_val2014_000000000009.jpg")
    assert data.image_key(2) == str(vqav2 / "val2014" / "000000000025.jpg")  # COCO 2017 naming, as it exists
    assert data[2]["answers"] == ["no"] * 10 and data[2]["answer_type"] == "yes/no"
    assert len(read_vqav2(vqav2 / "v2_questions.json", None, vqav2 / "val2014", size=2)) == 2


def test_read_vqav2_without_annotations(vqav2):
    data = read_vqav2(vqav2 / "v2_questions.json", None, vqav2 / "val2014")
    item = data[1]
    assert item["answers"] == [] and item["question_type"] is None and item["answer_type"] is None
    assert item["question"] == "How many balls are there?" and item["question_id"] == 9001


def test_read_vqav2_test_dev_names(vqav2):
    questions = json.loads((vqav2 / "v2_questions.json").read_text())
    questions["data_subtype"] = "test-dev2015"  # test-dev questions are about test2015 images
    (vqav2 / "v2_questions.json").write_text(json.dumps(questions))
    _png(vqav2 / "test2015" / "COCO_test2015_000000000009.jpg")
    data = read_vqav2(vqav2 / "v2_questions.json", None, vqav2 / "test2015")
    assert data.image_key(0) == str(vqav2 / "test2015" / "COCO_test2015_000000000009.jpg")


def test_read_vqav2_missing_image(vqav2):
    (vqav2 / "val2014" / "000000000025.jpg").unlink()
    data = read_vqav2(vqav2 / "v2_questions.json", vqav2 / "v2_annotations.json", vqav2 / "val2014")
    missing = vqav2 / "val2014" / "COCO_val2014_000000000025.jpg"
    with pytest.raises(DataError) as error:
        data[2]
    message = str(error.value)
    assert "\n" not in message and "v2_questions.json question 25000" in message and str(missing) in message


def test_read_vqav2_bad_files(vqav2):
    questions, annotations = vqav2 / "v2_questions.json", vqav2 / "v2_annotations.json"
    with pytest.raises(DataError, match="none of the first 2 VQA images exists"):
        read_vqav2(questions, annotations, vqav2)  # the wrong folder
    with pytest.raises(DataError, match="image folder not found"):
        read_vqav2(questions, annotations, vqav2 / "nope")
    with pytest.raises(DataError, match="has no 'questions' list"):
        read_vqav2(annotations, None, vqav2 / "val2014")  # the files swapped
    data = json.loads(annotations.read_text())
    del data["annotations"][2]
    annotations.write_text(json.dumps(data))
    with pytest.raises(DataError, match="no annotation for question 25000 of v2_questions.json"):
        read_vqav2(questions, annotations, vqav2 / "val2014")
    annotations.write_text('{"annotations": [')
    with pytest.raises(DataError, match="not valid JSON") as error:
        read_vqav2(questions, annotations, vqav2 / "val2014")
    assert isinstance(error.value.__cause__, json.JSONDecodeError)


def test_vqa_items_score_with_the_metric(vqav2):
    """A loader's items are what the scorer takes: predictions against their answers."""
    data = read_vqav2(vqav2 / "v2_questions.json", vqav2 / "v2_annotations.json", vqav2 / "val2014")
    rows = [{**data.without_image(i), "prediction": p} for i, p in enumerate(["Red", "one", "no"])]
    metrics, _ = VQAScorer().score(rows)
    assert metrics["vqa_accuracy"] == 1.0 and metrics["vqa_accuracy/number"] == 1.0
