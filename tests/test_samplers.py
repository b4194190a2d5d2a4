"""Length-grouped training order (loop/data/samplers.py): every row once per epoch, far less padding than random batches
on the shipped corpus' durations, an order set by (seed, epoch) alone, and, through `accelerator.prepare`, the same
batches after `set_epoch` and an exact continuation after `skip_first_batches`, on one process and split over two."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader

from loop.data.loaders import train_dataloader
from loop.data.samplers import LengthGroupedSampler, length_grouped_batches
from tests.conftest import CORPUS_ROOT

BATCH = 16
START = 401  # <|startoftranscript|> of the tiny model; the collator strips it from labels


@pytest.fixture(scope="module")
def durations() -> np.ndarray:
    """Seconds of every shipped clip (clip_durations.tsv holds milliseconds)."""
    lines = (CORPUS_ROOT / "hi" / "clip_durations.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return np.array([int(line.split("\t")[1]) / 1000 for line in lines])


@pytest.fixture(scope="module")
def table(durations) -> datasets.Dataset:
    """A prepared table's columns, with 4 samples of stand-in audio a row."""
    count = len(durations)
    return datasets.Dataset.from_dict({
        "audio": [np.full(4, i, dtype=np.int16) for i in range(count)],
        "audio_scale": [1.0] * count,
        "labels": [[START, i % 50, 400] for i in range(count)],
        "duration": durations.tolist(),
        "utterances": [1] * count,
    })


def padding_waste(batches: list[list[int]], durations: np.ndarray) -> float:
    """Seconds of padding: each batch padded to its longest clip."""
    return sum(durations[b].max() * len(b) - durations[b].sum() for b in batches)


def random_batches(count: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(count).tolist()
    return [order[i:i + BATCH] for i in range(0, count, BATCH)]


def loader_batches(loader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 368])
@pytest.mark.parametrize("batches_per_group", [1, 50])
def test_every_row_once_in_full_batches_and_a_short_one_last(durations, count, batches_per_group):
    batches = length_grouped_batches(durations[:count], BATCH, 42, 0, batches_per_group)
    assert sorted(i for b in batches for i in b) == list(range(count))
    assert all(len(b) == BATCH for b in batches[:-1])
    assert len(batches) == -(-count // BATCH)
    if count:
        assert durations[:count].argmax() in batches[0]  # the largest batch first, or the only one


def test_padding_waste_is_far_below_random_batching(durations):
    """368 shipped clips, 23 batches of 16: groups of 5 batches, sorted, waste a fraction of what random batches do."""
    epochs = range(5)
    grouped = np.mean([padding_waste(length_grouped_batches(durations, BATCH, 42, e), durations) for e in epochs])
    shuffled = np.mean([padding_waste(random_batches(len(durations), e), durations) for e in epochs])
    assert grouped < 0.3 * shuffled, (grouped, shuffled)


def test_the_order_is_a_function_of_seed_and_epoch(durations):
    sampler = LengthGroupedSampler(durations, BATCH, seed=42)
    first = list(sampler)
    assert len(sampler) == len(first) == len(durations)
    assert list(sampler) == first  # iterating again does not move on
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert list(LengthGroupedSampler(durations, BATCH, seed=42)) == first  # a fresh sampler: epoch 0 again
    # groups smaller than the epoch: the batches themselves change between epochs, not only their order
    assert {tuple(sorted(b)) for b in sampler.batches()} != {
        tuple(sorted(b)) for b in length_grouped_batches(durations, BATCH, 42, 0)}
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(durations, BATCH, seed=7)) != first
    assert length_grouped_batches(durations, BATCH, -1, 0)  # a negative seed is a seed too


def test_train_dataloader_groups_by_length(table, durations):
    loader = train_dataloader(table, BATCH, 42, START, group_by_length=True)
    batches = loader_batches(loader)
    assert batches == length_grouped_batches(durations, BATCH, 42, 0)
    first = next(iter(loader))
    torch.testing.assert_close(first["durations"], torch.tensor(durations[first["index"].numpy()], dtype=torch.float32))
    assert loader_batches(train_dataloader(table, BATCH, 42, START)) != batches  # off: the plain shuffle


def test_prepared_loader_repeats_an_epoch_and_skips_exactly(table, durations):
    """The loop's resume: `set_epoch(epoch)` on the prepared loader gives that epoch's batches every time (they are
    the sampler's), and `skip_first_batches` continues with exactly the batches that were not consumed."""
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(train_dataloader(table, BATCH, 42, START, group_by_length=True))
    loader.set_epoch(3)
    epoch3 = loader_batches(loader)
    assert epoch3 == length_grouped_batches(durations, BATCH, 42, 3)
    loader.set_epoch(4)
    assert loader_batches(loader) == length_grouped_batches(durations, BATCH, 42, 4) != epoch3
    loader.set_epoch(3)
    assert loader_batches(loader) == epoch3
    for consumed in (1, 7, len(epoch3) - 1):
        loader.set_epoch(3)
        assert loader_batches(accelerator.skip_first_batches(loader, consumed)) == epoch3[consumed:]


def test_split_over_two_processes_as_accelerate_shards_batches(durations):
    """With two processes `prepare` wraps the DataLoader's BatchSampler in `BatchSamplerShard`: process p gets
    batches p, p + 2, ... of the grouped order (the last round, holding the short batch, filled up with the
    epoch's first rows: `even_batches`), and `set_epoch` on the sharded loader still reaches the sampler."""
    durations = durations[:360]  # 22 batches of 16 and one of 8
    rows = torch.utils.data.TensorDataset(torch.arange(len(durations)))
    expected = length_grouped_batches(durations, BATCH, 42, 2)
    assert [len(b) for b in expected[-2:]] == [BATCH, 8]
    shards = []
    for process in (0, 1):
        sampler = LengthGroupedSampler(durations, BATCH, seed=42)
        loader = DataLoader(rows, batch_size=BATCH, sampler=sampler)
        sharded = prepare_data_loader(loader, num_processes=2, process_index=process, put_on_device=False)
        sharded.set_epoch(2)
        shards.append([batch[0].tolist() for batch in sharded])
        assert sampler.epoch == 2
        sharded.set_epoch(2)
        assert [b[0].tolist() for b in skip_first_batches(sharded, 3)] == shards[-1][3:]
    assert len(shards[0]) == len(shards[1]) == 12
    assert all(len(b) == BATCH for shard in shards for b in shard)
    assert shards[0][:11] == expected[0:22:2] and shards[1][:11] == expected[1:22:2]
    assert shards[0][11][:8] == expected[22]  # the short batch, filled up on process 0
    assert {i for shard in shards for b in shard for i in b} == set(range(len(durations)))
