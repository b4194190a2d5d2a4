"""Training rows streamed from shards (`data.streaming: true`, `data.source: shards`): no preparation pass, no
copy of the corpus on local disk, and no process holding more than a few windows of rows.

Every epoch is a function of (seed, epoch, process) alone, like the mapped path's order (`loop.data.samplers`):
- Each source's rows of one epoch: the data source gives every row once; each `data.mix` source its quota
  (`loop.data.samplers.epoch_quotas`) from an endless run of passes over its shards. Pass p of source k reads the
  shards in an order drawn from (seed, k, p): the data source's pass is the epoch.
- Process i of N takes rows [q*i/N, q*(i+1)/N) of each source's q rows of the epoch, so every row is read by one
  process, once.
- A process cuts its rows into windows of `data.shuffle_buffer` rows of the data source (each mixed source's
  rows spread over the windows in proportion). A window is read whole (row ranges of a few shards, read by row
  group), shuffled or, with `train.group_by_length`, length-grouped (`length_grouped_batches`) with a generator
  drawn from (seed, epoch, process, window), and cut into batches. The window is the shuffle and bucketing buffer.
- DataLoader workers take windows in turn: window m goes to worker (m - first) mod W, and the DataLoader hands
  their items back in that order, so the batches are the same whatever the number of workers.

A process's position is (epoch, window, batches of that window consumed): `StreamLoader.state_dict`, kept for
every process in the checkpoint (`LoopState.streams`). A resume reads that window again and skips the consumed
batches, so it sees exactly the batches an uninterrupted run would have; it must run on as many processes
(positions are per process), while the number of workers may change.

Damaged data is skipped and counted (`corrupt_shard`, `corrupt_row`) in the process's skip log, merged over the
processes into data_report.json at every checkpoint; a shard the index lists but the folder lacks stops the run
with its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, IterableDataset

from loop.data.audio import SAMPLE_RATE
from loop.data.collator import SpeechSeq2SeqCollator
from loop.data.loaders import arrow_rows
from loop.data.samplers import epoch_quotas, length_grouped_batches
from loop.data.shards import ShardError, ShardIndex, ShardReader, join
from loop.data.sources import DataError, SkipLog

ROW_COLUMNS = ["audio", "audio_scale", "labels", "duration", "utterances"]


def row_key(source: int, shard: int, row: int) -> int:
    """A streamed row's `index`: unique over the sources, shards and rows (and readable back from it)."""
    return (source << 48) | (shard << 24) | row


@dataclass(frozen=True)
class StreamSource:
    """One source of streamed training rows: its report name (`train`, `train.<mix name>`), shards and share."""

    name: str
    index: ShardIndex
    share: float


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of shard number `shard` of source number `source`."""

    source: int
    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class StreamPlan:
    """Which rows each window of each epoch holds, for one process, and how they are batched."""

    sources: tuple[StreamSource, ...]
    seed: int
    batch_size: int
    window_rows: int
    group_by_length: bool = False
    process_index: int = 0
    num_processes: int = 1

    def quotas(self) -> list[int]:
        """Rows each source gives one epoch (all processes together)."""
        return epoch_quotas([source.index.rows for source in self.sources], [source.share for source in self.sources])

    def process_rows(self, quota: int) -> tuple[int, int]:
        """This process's part [start, stop) of a source's `quota` rows of an epoch."""
        return quota * self.process_index // self.num_processes, quota * (self.process_index + 1) // self.num_processes

    def window_count(self) -> int:
        """Windows per epoch on this process (the same every epoch)."""
        start, stop = self.process_rows(self.quotas()[0])
        return max(1, -(-(stop - start) // self.window_rows))

    def shard_order(self, source: int, number: int) -> np.ndarray:
        """The order of `source`'s shards in its pass `number`."""
        return np.random.default_rng([self.seed % 2**64, source, number]).permutation(
            len(self.sources[source].index.shards))

    def window_segments(self, epoch: int, window: int) -> list[Segment]:
        """The row ranges window `window` of `epoch` reads, source by source."""
        windows, segments = self.window_count(), []
        for source, quota in enumerate(self.quotas()):
            start, stop = self.process_rows(quota)
            first = epoch * quota + start + (stop - start) * window // windows
            last = epoch * quota + start + (stop - start) * (window + 1) // windows
            segments += self.stream_segments(source, first, last)
        return segments

    def stream_segments(self, source: int, first: int, last: int) -> list[Segment]:
        """Positions [first, last) of `source`'s endless stream of passes, as row ranges of its shards."""
        shards = self.sources[source].index.shards
        total, segments, position = sum(shard.rows for shard in shards), [], first
        while position < last:
            number, offset = divmod(position, total)
            order = self.shard_order(source, number)
            sizes = np.array([shards[i].rows for i in order])
            ends = np.cumsum(sizes)
            slot = int(np.searchsorted(ends, offset, side="right"))
            start = int(offset - (ends[slot] - sizes[slot]))
            take = int(min(last - position, sizes[slot] - start))
            segments.append(Segment(source, int(order[slot]), start, start + take))
            position += take
        return segments

    def window_batches(self, epoch: int, window: int, durations) -> list[list[int]]:
        """A window's rows (by position) in batches: shuffled, or length-grouped with `group_by_length`."""
        key = (self.process_index, window)
        if self.group_by_length:
            return length_grouped_batches(durations, self.batch_size, self.seed, epoch, key=key)
        order = np.random.default_rng([self.seed % 2**64, epoch, *key]).permutation(len(durations))
        return [order[start:start + self.batch_size].tolist() for start in range(0, len(order), self.batch_size)]


def row_problem(row: dict) -> str:
    """Why a streamed row cannot be trained on ("" when it can)."""
    if len(row["audio"]) == 0:
        return "no audio"
    if not np.isfinite(row["audio_scale"]) or row["audio_scale"] <= 0:
        return f"audio scale {row['audio_scale']}"
    if len(row["labels"]) == 0:
        return "no labels"
    if abs(len(row["audio"]) / SAMPLE_RATE - float(row["duration"])) > 0.01:
        return f"{len(row['audio'])} samples, but a duration of {float(row['duration']):.3f} s"
    return ""


def read_window(plan: StreamPlan, epoch: int, window: int, readers: dict, skips: SkipLog,
                verify: bool = True) -> list[dict]:
    """A window's usable rows (`ROW_COLUMNS` and `index`); damaged shards and rows are counted in `skips`."""
    rows = []
    for segment in plan.window_segments(epoch, window):
        index = plan.sources[segment.source].index
        reader = readers.setdefault(segment.source, ShardReader(index, verify))
        shard = index.shards[segment.shard]
        try:
            table = reader.read(shard, segment.start, segment.stop, ROW_COLUMNS)
        except ShardError as error:
            if error.reason == "missing_shard":
                raise
            skips.add(error.reason, f"{error} ({segment.stop - segment.start} rows skipped)",
                      count=segment.stop - segment.start)
            continue
        keys = [row_key(segment.source, segment.shard, row) for row in range(segment.start, segment.stop)]
        for number, row in enumerate(arrow_rows(table, keys, ROW_COLUMNS), start=segment.start):
            if problem := row_problem(row):
                skips.add("corrupt_row", f"{join(index.url, shard.name)} row {number}: {problem}")
            else:
                rows.append(row)
    return rows


def pack_window(rows: list[dict]) -> dict:
    """A window's rows as a few flat arrays (one shared-memory tensor each when a worker hands them over)."""
    audio = [row["audio"] for row in rows]
    labels = [row["labels"] for row in rows]
    return {
        "audio": np.concatenate(audio) if rows else np.zeros(0, np.int16),
        "audio_ends": np.cumsum([len(a) for a in audio], dtype=np.int64),
        "labels": np.concatenate(labels) if rows else np.zeros(0, np.int32),
        "label_ends": np.cumsum([len(lab) for lab in labels], dtype=np.int64),
        **{name: np.array([row[name] for row in rows]) for name in ("audio_scale", "duration", "utterances", "index")},
    }


def window_rows(item: dict, positions: list[int]) -> list[dict]:
    """The rows at `positions` of a packed window, as the collator takes them (views, no copies)."""
    rows = []
    for p in positions:
        audio_start = int(item["audio_ends"][p - 1]) if p else 0
        label_start = int(item["label_ends"][p - 1]) if p else 0
        rows.append({"audio": item["audio"][audio_start:int(item["audio_ends"][p])],
                     "labels": item["labels"][label_start:int(item["label_ends"][p])],
                     **{name: item[name][p].item() for name in ("audio_scale", "duration", "utterances", "index")}})
    return rows


class WindowStream(IterableDataset):
    """One epoch's windows from `first_window` on, as packed rows with their batches; in a DataLoader with W workers,
    worker w reads windows first_window + w, + w + W, ... (the first one's batches from `first_batch` on)."""

    def __init__(self, plan: StreamPlan, epoch: int, first_window: int, first_batch: int, verify: bool, strict: bool):
        self.plan, self.epoch, self.first_window, self.first_batch = plan, epoch, first_window, first_batch
        self.verify, self.strict = verify, strict

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        readers: dict = {}
        for window in range(self.first_window + worker, self.plan.window_count(), workers):
            skips = SkipLog(self.strict)
            rows = read_window(self.plan, self.epoch, window, readers, skips, self.verify)
            batches = self.plan.window_batches(self.epoch, window, [row["duration"] for row in rows])
            first = self.first_batch if window == self.first_window else 0
            yield {**pack_window(rows), "epoch": self.epoch, "window": window, "first": first,
                   "batches": batches, "skips": skips.as_dict()}


@dataclass
class StreamPosition:
    """Where a process is: `batch` batches of window `window` of epoch `epoch` consumed."""

    epoch: int = 0
    window: int = 0
    batch: int = 0


class StreamLoader:
    """The training loader over streamed shards: an endless iterator of collated batches on `device`, which keeps
    this process's `position` and skip log (`state_dict`, `load_state_dict`). Not passed to
    `accelerator.prepare`: it splits the rows over the processes itself."""

    def __init__(self, plan: StreamPlan, collate, num_workers: int = 0, device=None, verify: bool = True,
                 strict: bool = False):
        self.plan, self.collate, self.num_workers, self.device = plan, collate, num_workers, device
        self.verify, self.strict = verify, strict
        self.position = StreamPosition()
        self.skips = SkipLog()

    def state_dict(self) -> dict:
        p = self.position
        return {"epoch": p.epoch, "window": p.window, "batch": p.batch, **self.skips.as_dict()}

    def load_state_dict(self, streams: list[dict]) -> None:
        """Takes this process's entry of a checkpoint's `LoopState.streams` (one per process)."""
        if len(streams) != self.plan.num_processes:
            raise DataError(f"the checkpoint streamed its shards on {len(streams)} processes, this run has "
                            f"{self.plan.num_processes}: positions are per process, so resume it on "
                            f"{len(streams)} (accelerate launch --num_processes {len(streams)})")
        mine = streams[self.plan.process_index]
        self.position = StreamPosition(mine["epoch"], mine["window"], mine["batch"])
        self.skips = SkipLog()
        self.skips.merge(mine)

    def after(self, epoch: int, window: int, consumed: int, count: int) -> StreamPosition:
        """The position once `consumed` of a window's `count` batches are consumed (a finished window: the next)."""
        if consumed < count:
            return StreamPosition(epoch, window, consumed)
        if window + 1 < self.plan.window_count():
            return StreamPosition(epoch, window + 1, 0)
        return StreamPosition(epoch + 1, 0, 0)

    def epoch_items(self):
        """The packed windows of the current epoch from the current position, read by the workers."""
        p = self.position
        stream = WindowStream(self.plan, p.epoch, p.window, p.batch, self.verify, self.strict)
        workers = self.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=1 if workers else None,
                          pin_memory=torch.cuda.is_available())

    def __iter__(self):
        while True:
            epoch, whole_epoch, given = self.position.epoch, self.position == StreamPosition(self.position.epoch), 0
            for item in self.epoch_items():
                item = {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in item.items()}
                if item["first"] == 0:  # a window met again on resume was counted before
                    self.skips.merge(item["skips"])
                count = len(item["batches"])
                if count == 0:
                    self.position = self.after(epoch, item["window"], 0, 0)
                for consumed, positions in enumerate(item["batches"][item["first"]:], start=item["first"] + 1):
                    self.position = self.after(epoch, item["window"], consumed, count)
                    given += 1
                    yield send_to_device(self.collate(window_rows(item, positions)), self.device)
            if whole_epoch and not given:
                raise DataError(f"epoch {epoch} gave no training rows on process {self.plan.process_index}: "
                                f"every row was skipped ({dict(self.skips.counts)})")
            self.position = StreamPosition(epoch + 1)


def stream_loader(config, sources: tuple[StreamSource, ...], decoder_start_token_id: int, accelerator) -> StreamLoader:
    """The run's `StreamLoader`: `data.shuffle_buffer` windows, the training batch size and seed, this process's
    place among the run's processes."""
    t, d = config.train, config.data
    plan = StreamPlan(sources, t.seed, t.per_device_train_batch_size, d.shuffle_buffer, t.group_by_length,
                      accelerator.process_index, accelerator.num_processes)
    if plan.quotas()[0] < accelerator.num_processes:
        raise DataError(f"{sources[0].index.url}: {plan.quotas()[0]} rows cannot be shared by "
                        f"{accelerator.num_processes} processes")
    return StreamLoader(plan, SpeechSeq2SeqCollator(decoder_start_token_id), t.dataloader_num_workers,
                        accelerator.device, d.verify_shards, d.strict)


def merged_skips(streams: list[dict]) -> dict:
    """The rows every process skipped while streaming (their `StreamLoader.state_dict`s), as one skip log."""
    log = SkipLog()
    for stream in streams:
        log.merge(stream)
    return {"stream_" + name: values for name, values in log.as_dict().items()}
