"""Score saved few-shot VQA outputs again (the raw generations are kept), e.g. after a change to answer extraction.

    python docs/scripts/rescore_vqa.py runs/exp_base/test_vqa_examples.jsonl

rewrites the file's neighbour `test_vqa_metrics.json` and the examples' scores, and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frozen_prefix.evaluation.fewshot import score_vqa_rows
from frozen_prefix.evaluation.report import fewshot_table, write_task_results


def main() -> None:
    """Rescore one *_vqa_examples.jsonl file in place."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", type=Path, help="a SPLIT_vqa_examples.jsonl written by evaluate --task vqa")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.examples.read_text().splitlines() if line.strip()]
    results, scored = score_vqa_rows(rows)
    name = args.examples.name.removesuffix("_examples.jsonl")
    write_task_results(args.examples.parent, name, results, scored)
    print(fewshot_table(results, "vqa_accuracy", f"{name} shots"))


if __name__ == "__main__":
    main()
