"""Writing a split's prepared rows as shards (`scripts/prepare_data.py --shards DIR`; format: `loop.data.shards`).

The split's utterances are cut into consecutive pieces of `shard_utterances`; each piece is prepared exactly as the
cached path prepares rows (`loop.data.prepare.prepare_batch`: the same decoding, checks, packing and timestamps)
and written as one shard. Pieces are prepared in parallel (`num_proc` processes). Each finished shard gets a
sidecar, `shard-NNNNN.json` (its rows, bytes, SHA-256 and its piece of the report), written after the shard
itself: a killed preparation is run again with the same command and prepares only the pieces without one. The
index is written last, from the sidecars, so a split folder with `index.json` is complete.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import tempfile
from dataclasses import asdict

import datasets
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from loop.data.prepare import PREPARED_FEATURES, SplitReport, prepare_batch, tally
from loop.data.rows import NO_TIMESTAMPS, RowChecks
from loop.data.shards import (
    COLUMNS,
    INDEX_FILE,
    ShardIndex,
    ShardInfo,
    file_sha256,
    filesystem,
    join,
    shard_name,
    tokenizer_fingerprint,
    write_shard_table,
)
from loop.data.sources import DataError, SkipLog
from loop.data.timestamp_labels import TimestampSettings

SHARD_SCHEMA = datasets.Features({name: PREPARED_FEATURES[name] for name in COLUMNS}).arrow_schema


def sidecar_name(number: int) -> str:
    return shard_name(number).replace(".parquet", ".json")


def shard_settings(tokenizer, checks: RowChecks, pack_to_seconds: float, timestamps: TimestampSettings,
                   shard_utterances: int, source: str) -> dict:
    """What decides a split's shards; a folder holding shards of other settings is not resumed into."""
    return {**tokenizer_fingerprint(tokenizer), "checks": asdict(checks), "pack_to_seconds": pack_to_seconds,
            "timestamps": asdict(timestamps), "shard_utterances": shard_utterances, "source": source}


def prepare_piece(rows: datasets.Dataset, tokenizer, checks: RowChecks, strict: bool, pack_to_seconds: float,
                  timestamps: TimestampSettings) -> tuple[pa.Table, SplitReport]:
    """One shard's rows, prepared in map-sized batches as `loop.data.prepare.prepare` does, and their report."""
    step = 64 if pack_to_seconds else 16  # packing joins utterances within one batch, as the cached path does
    columns: dict[str, list] = {}
    for start in range(0, len(rows), step):
        out = prepare_batch(rows[start:start + step], tokenizer, checks, strict, pack_to_seconds, timestamps)
        for name, values in out.items():
            columns.setdefault(name, []).extend(values)
    report = SplitReport("piece", skips=SkipLog())
    reasons = columns.get("skip_reason", [])
    kept = [i for i, reason in enumerate(reasons) if not reason]
    usable = {name: [columns[name][i] for i in kept] for name in COLUMNS}
    tally(report, reasons, columns.get("utterances", []),
          [message for message, reason in zip(columns.get("skip_message", []), reasons) if reason],
          usable, packed=pack_to_seconds > 0)
    return pa.Table.from_pydict(usable, schema=SHARD_SCHEMA), report


def write_piece(url: str, number: int, rows: datasets.Dataset, settings: dict, tokenizer, checks: RowChecks,
                strict: bool, pack_to_seconds: float, timestamps: TimestampSettings) -> dict:
    """Prepares and writes shard `number` and then its sidecar; returns the sidecar's contents."""
    table, report = prepare_piece(rows, tokenizer, checks, strict, pack_to_seconds, timestamps)
    fs, root = filesystem(url)
    local = isinstance(fs, LocalFileSystem)
    with tempfile.TemporaryDirectory(dir=root if local else None) as scratch:
        written = os.path.join(scratch, shard_name(number))
        write_shard_table(table, written)
        size, digest = os.path.getsize(written), file_sha256(LocalFileSystem(), written)
        if local:
            os.replace(written, join(root, shard_name(number)))
        else:
            fs.put_file(written, join(root, shard_name(number)))
    info = ShardInfo(shard_name(number), table.num_rows, report.kept, round(report.audio_seconds, 3), size, digest)
    sidecar = {"shard": asdict(info), "report": report.as_dict(), "settings": settings}
    _write_json(fs, join(root, sidecar_name(number)), sidecar)
    return sidecar


def _write_json(fs, path: str, values: dict) -> None:
    """Atomically where the filesystem can rename (local), else one put (object stores write whole objects)."""
    data = json.dumps(values, ensure_ascii=False, indent=1).encode()
    partial = path + ".partial"
    fs.pipe_file(partial, data)
    fs.mv(partial, path)


def finished_pieces(fs, root: str, count: int, settings: dict) -> dict[int, dict]:
    """The sidecars of shards already written with these settings (and whose shard is there at its size)."""
    done = {}
    for number in range(count):
        try:
            with fs.open(join(root, sidecar_name(number)), "rb") as file:
                sidecar = json.loads(file.read())
            if fs.size(join(root, shard_name(number))) != sidecar["shard"]["bytes"]:
                continue
        except (FileNotFoundError, ValueError, KeyError):
            continue
        if sidecar.get("settings") != settings:
            raise DataError(f"{join(root, sidecar_name(number))}: written with other settings than this run's "
                            "(model, limits, packing or shard size); write to an empty folder")
        done[number] = sidecar
    return done


def write_split_shards(rows: datasets.Dataset, url: str, split: str, tokenizer, report: SplitReport,
                       checks: RowChecks, *, shard_utterances: int, num_proc: int = 1, pack_to_seconds: float = 0.0,
                       timestamps: TimestampSettings = NO_TIMESTAMPS, source: str = "") -> ShardIndex:
    """Writes `rows` (a split's utterances) as shards under `url` (the split's folder) and its index; shards
    already written by a killed run with the same settings are kept. `report` (holding the rows skipped while
    reading) gets the preparation's counts."""
    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    count = max(1, -(-len(rows) // shard_utterances))
    settings = shard_settings(tokenizer, checks, pack_to_seconds, timestamps, shard_utterances, source)
    done = finished_pieces(fs, root, count, settings)
    todo = [number for number in range(count) if number not in done]
    common = (settings, tokenizer, checks, report.skips.strict, pack_to_seconds, timestamps)

    def piece(number: int) -> datasets.Dataset:  # a small table of its own: cheap to send to a worker
        start = number * shard_utterances
        return datasets.Dataset.from_dict(rows[start:start + shard_utterances], features=rows.features)

    if num_proc > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")  # no fork of a process holding tokenizer threads
        with concurrent.futures.ProcessPoolExecutor(min(num_proc, len(todo)), mp_context=context) as pool:
            futures = {pool.submit(write_piece, url, number, piece(number), *common): number
                       for number in todo}
            for future in concurrent.futures.as_completed(futures):
                done[futures[future]] = future.result()
    else:
        for number in todo:
            done[number] = write_piece(url, number, piece(number), *common)
    shards = [ShardInfo(**done[number]["shard"]) for number in range(count)]
    for number in range(count):
        report.add(SplitReport.from_dict(split, done[number]["report"]))
    report.audio_seconds = sum(shard.seconds for shard in shards)
    index = ShardIndex(url, split, tuple(shards), settings, report.as_dict())
    _write_json(fs, join(root, INDEX_FILE), index.to_json())
    return index
