"""How well the frozen LM answers the shapes VQA questions when it is given the scene as text instead of an image.

Each test question follows the gold positional caption of its scene ("A red circle at the top left and a blue
square on the right."), after `--shots` worked examples from the training split in the same layout; the LM
answers greedily and the answer is scored with the official VQA accuracy. Perception is perfect here: what is
left is the frozen LM's own reading. Prints the accuracy overall and per question family.

    python docs/scripts/vqa_text_bound.py --shots 6 --questions 300
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from frozen_prefix.data.shapes import make_captions
from frozen_prefix.data.shapes_vqa import ShapesVQA
from frozen_prefix.evaluation.metrics.vqa import vqa_accuracy
from frozen_prefix.models.lm import load_lm


def example(item: dict, answer: bool) -> str:
    """'Context: <the scene with positions> Question: <q> Answer:' (plus the answer for a worked example)."""
    text = f"Context: {make_captions(item['scene'])[3]} Question: {item['question']} Answer:"
    return f"{text} {item['answer']}\n" if answer else text


def main() -> None:
    """Score the frozen LM on the scene-as-text questions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=6, help="worked examples before each question")
    parser.add_argument("--questions", type=int, default=300, help="test questions (round-robin over the families)")
    parser.add_argument("--lm", default="smollm2-135m")
    args = parser.parse_args()
    lm, tokenizer = load_lm(args.lm)
    train, test = ShapesVQA("train"), ShapesVQA("test")
    demos = "".join(example(train.question(i), answer=True) for i in range(args.shots))  # one of each family
    scores: dict[str, list[float]] = defaultdict(list)
    for i in range(args.questions):
        item = test.question(i)
        ids = tokenizer(demos + example(item, answer=False), return_tensors="pt").input_ids
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().split("\n")[0]
        scores[item["family"]].append(vqa_accuracy(reply.split(" Question")[0].rstrip("."), [item["answer"]] * 10))
    every = [s for family in scores.values() for s in family]
    print(f"scene as text, {args.shots} shots, {len(every)} questions: {100 * sum(every) / len(every):.1f}")
    for family, values in scores.items():
        print(f"  {family:9s} {100 * sum(values) / len(values):5.1f}  ({len(values)} questions)")


if __name__ == "__main__":
    main()
