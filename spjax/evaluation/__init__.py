"""Evaluation of trained models: loss, perplexity and bits per byte over a prepared dataset
split (`spjax eval`), and the lm-evaluation-harness adapter (lm_eval_adapter.py)."""
