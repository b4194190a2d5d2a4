"""whisper-loop: fine-tune Whisper with a plain Accelerate training loop.

Layers, lowest first (tests/test_layout.py keeps imports running downward): `config`, `files`, `languages`,
`extras` -> `data` -> `model` -> `run` -> `eval` -> `ship` -> the loop itself (`train`, `train_log`, `results`,
`optimizers`, `cli`). docs/architecture.md is the map."""
