"""The loop against the classic `Seq2SeqTrainer` recipe, measured on one machine (see `benchmarks/run.py`).

Not part of the installed package: it imports `loop` and its own modules, and runs from the project root as
`python -m benchmarks.run ...`.
"""
