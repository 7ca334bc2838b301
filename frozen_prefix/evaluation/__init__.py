"""Evaluation: captioning metrics, the few-shot VQA and binding tasks, dialogue, and their reports."""
