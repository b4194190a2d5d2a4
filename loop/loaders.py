"""DataLoaders over prepared tables: a seeded, shuffled training loader and longest-first evaluation loaders.

The one place loaders are built, for the training loop, in-loop evaluation, `scripts/evaluate.py` and the
benchmark, so every path batches, collates and orders rows the same way.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from loop.collator import SpeechSeq2SeqCollator
from loop.samplers import LengthGroupedSampler


class Rows(torch.utils.data.Dataset):
    """A prepared table as a map-style torch dataset whose rows carry their position (`index`), so evaluation
    can gather predictions from several processes and match them to references exactly once."""

    COLUMNS = ["input_features", "labels", "duration", "utterances"]

    def __init__(self, table: datasets.Dataset, order: list[int] | None = None):
        self.table = table.with_format("numpy", columns=self.COLUMNS)
        self.order = order if order is not None else list(range(len(table)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict:
        index = self.order[position]
        row = self.table[index]
        row["index"] = index
        return row

    def __getitems__(self, positions: list[int]) -> list[dict]:
        """A whole batch in one Arrow read (the DataLoader calls this instead of `__getitem__` once per row)."""
        indices = [self.order[position] for position in positions]
        columns = self.table[indices]
        return [{**{name: columns[name][i] for name in self.COLUMNS}, "index": index} for i, index in enumerate(indices)]


def longest_first(table: datasets.Dataset) -> list[int]:
    """Row order for generation: longest audio first, so each batch decodes rows of similar length and the
    first batch shows at once whether the largest one fits in memory."""
    return [int(i) for i in np.argsort(-np.asarray(table["duration"]), kind="stable")]


def _common(decoder_start_token_id: int, num_workers: int) -> dict:
    return {"collate_fn": SpeechSeq2SeqCollator(decoder_start_token_id), "num_workers": num_workers,
            "pin_memory": torch.cuda.is_available(), "persistent_workers": num_workers > 0}


def train_dataloader(table: datasets.Dataset, batch_size: int, seed: int, decoder_start_token_id: int,
                     num_workers: int = 0, group_by_length: bool = False) -> DataLoader:
    """Shuffled with a seeded generator of its own, so the order does not draw on the global RNG (which a
    resume restores) and an epoch's order is the same after a resume. With `group_by_length`, batches of similar
    `duration` in an order set by (seed, epoch) (`loop.samplers`)."""
    sampler = LengthGroupedSampler(table["duration"], batch_size, seed) if group_by_length else None
    return DataLoader(Rows(table), batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=False,
                      generator=torch.Generator().manual_seed(seed),
                      **_common(decoder_start_token_id, num_workers))


def eval_dataloader(table: datasets.Dataset, batch_size: int, decoder_start_token_id: int,
                    num_workers: int = 0) -> DataLoader:
    """Longest clips first (see `longest_first`)."""
    return DataLoader(Rows(table, longest_first(table)), batch_size=batch_size,
                      **_common(decoder_start_token_id, num_workers))
