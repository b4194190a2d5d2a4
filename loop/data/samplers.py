"""Length-grouped training order: batches of clips of similar duration, so that a batch's padding, and with
`model.encoder_window: dynamic` its window, is short for every row and not only for the longest.

The order of an epoch is a function of (seed, epoch) alone, as HF Trainer's `group_by_length` and lhotse's
bucketing samplers make theirs: the rows are shuffled, cut into groups of `batches_per_group` batches, each group is
sorted by duration and cut into batches, and the batches are shuffled. Nothing is drawn from a generator that
lives on between epochs, so a resumed run gets the epoch's order back from `set_epoch(epoch)` and skips the batches
it has consumed exactly (`accelerator.skip_first_batches`).

`LengthGroupedSampler` is an index sampler: the DataLoader's own `BatchSampler` (same `batch_size`, `drop_last`
off) cuts its order into the batches it made, the short one last. That is what `accelerator.prepare` shards as it
does any loader (`BatchSamplerShard`: batch i goes to process i mod N, and with `even_batches` the last round is
filled with rows from the epoch's first batches) and what `DataLoaderShard.set_epoch` reaches on one process and
on several: it calls `set_epoch` on `batch_sampler.sampler` or `batch_sampler.batch_sampler.sampler`, never on a
custom batch sampler wrapped in `BatchSamplerShard`. It has no `generator` attribute, so Accelerate does not
synchronise one: every process computes the same order from the seed.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

BATCHES_PER_GROUP = 50  # HF Trainer's mega-batch of 50 batches
MIN_GROUPS = 4  # ... and at least four groups per epoch, so a small set still gets new batches every epoch


def length_grouped_batches(durations, batch_size: int, seed: int, epoch: int,
                           batches_per_group: int = BATCHES_PER_GROUP, key: tuple[int, ...] = ()) -> list[list[int]]:
    """Row indices of `durations` in batches of `batch_size` (the last one shorter when the rows do not divide):
    shuffled, grouped by `batches_per_group` batches (fewer when the epoch has under `MIN_GROUPS` groups of that
    size; a group as large as the epoch would give the same batches every epoch, only reordered), each group sorted
    longest first and cut into batches, the full batches shuffled. The batch holding the longest clip comes first,
    so the first step shows whether the largest batch fits in memory; the short batch comes last. `key` adds to
    the seed (a streamed window's process and number: `loop.data.streaming`)."""
    durations = np.asarray(durations, dtype=np.float64)
    count = len(durations)
    rng = np.random.default_rng([seed % 2**64, epoch, *key])  # SeedSequence entropy: non-negative integers
    order = rng.permutation(count)
    group = batch_size * max(1, min(batches_per_group, count // (batch_size * MIN_GROUPS)))
    grouped = np.concatenate([
        part[np.argsort(-durations[part], kind="stable")]  # stable: ties keep the shuffled order
        for part in np.split(order, list(range(group, count, group)))
    ]) if count else order
    batches = [grouped[start:start + batch_size].tolist() for start in range(0, count, batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        longest = max(range(len(batches)), key=lambda i: durations[batches[i]].max())
        batches.insert(0, batches.pop(longest))
    return batches + short


class LengthGroupedSampler(Sampler[int]):
    """Row indices in `length_grouped_batches` order for the epoch set by `set_epoch` (0 until then). Give the
    DataLoader the same `batch_size` and `drop_last=False`, so its batches are the grouped ones."""

    def __init__(self, durations, batch_size: int, seed: int, batches_per_group: int = BATCHES_PER_GROUP):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_group = batches_per_group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches."""
        return length_grouped_batches(self.durations, self.batch_size, self.seed, self.epoch, self.batches_per_group)

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.durations)


# Data mixing (`data.mix`): an epoch drawn from the table's parts (`loop.data.mixing.TrainPart`), as a function of
# (seed, epoch) alone, like the length-grouped order, so that a resume skips exactly the consumed batches.


def epoch_quotas(sizes: list[int], shares: list[float]) -> list[int]:
    """Rows each part gives one epoch: the first part (the data source) all of its rows, once; so an epoch has
    `sizes[0] / shares[0]` rows, and every other part its share of them (rounded, at least 1)."""
    total = sizes[0] / shares[0]
    return [sizes[0]] + [max(1, round(share * total)) for share in shares[1:]]


def mixed_epoch_order(sizes: list[int], shares: list[float], seed: int, epoch: int) -> np.ndarray:
    """Table rows of one epoch over parts of `sizes` rows lying end to end, each part giving `epoch_quotas` rows,
    shuffled together so that every batch mixes the parts at about their shares.

    The first part gives each of its rows once. Every other part is drawn without replacement across epochs:
    its rows are read from an endless stream of permutations (one per pass over the part, seeded by (seed, part,
    pass)), epoch e taking the stream's quota positions from e x quota on, so every row is seen before any is seen
    again; a part smaller than its quota repeats rows within an epoch. Nothing depends on earlier epochs having run."""
    quotas = epoch_quotas(sizes, shares)
    offsets = np.cumsum([0, *sizes[:-1]])
    chosen = [np.arange(sizes[0], dtype=np.int64)]
    for part in range(1, len(sizes)):
        size, quota = sizes[part], quotas[part]
        first, last = epoch * quota, (epoch + 1) * quota  # stream positions [first, last)
        passes = range(first // size, (last - 1) // size + 1)
        stream = np.concatenate([np.random.default_rng([seed % 2**64, part, p]).permutation(size) for p in passes])
        start = first - passes[0] * size
        chosen.append(offsets[part] + stream[start:start + quota])
    order = np.concatenate(chosen)
    return order[np.random.default_rng([seed % 2**64, epoch]).permutation(len(order))]


class MixedSampler(Sampler[int]):
    """Table rows in `mixed_epoch_order` for the epoch set by `set_epoch` (0 until then); with `batch_size`, the
    epoch's rows in length-grouped batches (`length_grouped_batches` over them), for `train.group_by_length`."""

    def __init__(self, durations, sizes: list[int], shares: list[float], seed: int, batch_size: int | None = None):
        self.durations = np.asarray(durations, dtype=np.float64)
        self.sizes, self.shares, self.seed, self.batch_size = list(sizes), list(shares), seed, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        rows = mixed_epoch_order(self.sizes, self.shares, self.seed, self.epoch)
        if self.batch_size is None:
            return rows
        batches = length_grouped_batches(self.durations[rows], self.batch_size, self.seed, self.epoch)
        return rows[np.concatenate(batches)] if batches else rows

    def __iter__(self):
        yield from self.order().tolist()

    def __len__(self) -> int:
        return sum(epoch_quotas(self.sizes, self.shares))
