"""Scoring a model: generation-based evaluation, metrics (WER, CER, hallucination, language ID), guard sets,
timestamps and long-form evaluation, reports, and the evaluation of a saved model (`scripts/evaluate.py`)."""
