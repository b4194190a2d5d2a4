"""DataLoaders over prepared tables: a seeded, shuffled training loader and longest-first evaluation loaders.

The one place loaders are built, for the training loop, in-loop evaluation, `scripts/evaluate.py` and the
benchmark, so every path batches, collates and orders rows the same way.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from loop.data.collator import SpeechSeq2SeqCollator
from loop.data.samplers import LengthGroupedSampler, MixedSampler


class Rows(torch.utils.data.Dataset):
    """A prepared table as a map-style torch dataset whose rows carry their position (`index`), so evaluation
    can gather predictions from several processes and match them to references exactly once.

    Rows are read straight from Arrow: list columns (the int16 audio, the labels) come back as NumPy views of
    their stored type, where `datasets`' NumPy format would copy them to int64 first (four times the audio)."""

    COLUMNS = ["audio", "audio_scale", "labels", "duration", "utterances"]

    def __init__(self, table: datasets.Dataset, order: list[int] | None = None):
        self.table = table.with_format("arrow", columns=self.COLUMNS)
        self.order = order if order is not None else list(range(len(table)))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: list[int]) -> list[dict]:
        """A whole batch in one Arrow read (the DataLoader calls this instead of `__getitem__` once per row)."""
        indices = [self.order[position] for position in positions]
        return arrow_rows(self.table[indices], indices, self.COLUMNS)


def arrow_rows(batch: pa.Table, indices: list[int], columns: list[str]) -> list[dict]:
    """The rows of an Arrow table as dicts of `columns` plus `index` (from `indices`), list columns as NumPy views
    of their stored type."""
    rows = [{"index": index} for index in indices]
    for name in columns:
        column = batch.column(name).combine_chunks()
        if pa.types.is_list(column.type):
            offsets = column.offsets.to_numpy()
            values = column.flatten().to_numpy(zero_copy_only=False)
            for row, start, end in zip(rows, offsets[:-1] - offsets[0], offsets[1:] - offsets[0]):
                row[name] = values[start:end]
        else:
            for row, value in zip(rows, column.to_numpy(zero_copy_only=False)):
                row[name] = value
    return rows


def longest_first(table: datasets.Dataset) -> list[int]:
    """Row order for generation: longest audio first, so each batch decodes rows of similar length and the
    first batch shows at once whether the largest one fits in memory."""
    return [int(i) for i in np.argsort(-np.asarray(table["duration"]), kind="stable")]


def _common(decoder_start_token_id: int, num_workers: int) -> dict:
    return {"collate_fn": SpeechSeq2SeqCollator(decoder_start_token_id), "num_workers": num_workers,
            "pin_memory": torch.cuda.is_available(), "persistent_workers": num_workers > 0}


def train_dataloader(table: datasets.Dataset, batch_size: int, seed: int, decoder_start_token_id: int,
                     num_workers: int = 0, group_by_length: bool = False, parts: list | None = None) -> DataLoader:
    """Shuffled with a seeded generator of its own, so the order does not draw on the global RNG (which a
    resume restores) and an epoch's order is the same after a resume. With `group_by_length`, batches of similar
    `duration` in an order set by (seed, epoch) (`loop.data.samplers`). With more than one of `parts`
    (`loop.data.mixing.TrainPart`, `data.mix`), each epoch draws the parts at their shares (`MixedSampler`)."""
    if parts and len(parts) > 1:
        sampler = MixedSampler(table["duration"], [part.rows for part in parts], [part.share for part in parts],
                               seed, batch_size if group_by_length else None)
    else:
        sampler = LengthGroupedSampler(table["duration"], batch_size, seed) if group_by_length else None
    return DataLoader(Rows(table), batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=False,
                      generator=torch.Generator().manual_seed(seed),
                      **_common(decoder_start_token_id, num_workers))


def eval_dataloader(table: datasets.Dataset, batch_size: int, decoder_start_token_id: int,
                    num_workers: int = 0) -> DataLoader:
    """Longest clips first (see `longest_first`)."""
    return DataLoader(Rows(table, longest_first(table)), batch_size=batch_size,
                      **_common(decoder_start_token_id, num_workers))
