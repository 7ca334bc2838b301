"""Evaluation: caption metrics, few-shot VQA and binding, dialogue, the evaluate command."""
