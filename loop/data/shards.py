"""Prepared rows as shards: Parquet files of a split's rows, with an index, on any fsspec path.

A shard folder holds one subfolder per split (`train/`, `selection/`, `test/`), each with `shard-NNNNN.parquet`
files and `index.json`, which lists every shard's rows, utterances, seconds of audio, bytes and SHA-256, the
settings the rows were prepared with (the tokenizer's hash and label prefix among them) and the preparation's
report (read, kept, skipped by reason). `scripts/prepare_data.py --shards DIR` writes them
(`loop.data.shard_writer`); `data.source: shards` reads them, whole for evaluation or streamed for training
(`loop.data.streaming`).

Why Parquet: the prepared columns keep their types (int16 audio, int32 labels) with no encoding of our own;
row groups let a reader seek to a row without reading the shard from the start, which exact resume needs; and
`datasets` (`load_dataset("parquet", data_files=..., streaming=True)`), pyarrow, DuckDB and Polars read the files
as they are. Each page carries a CRC checked on read, and the index a SHA-256 per file.

Paths are fsspec URLs: a local folder, `s3://...` (s3fs), `gs://...` (gcsfs), `hf://datasets/...`, or
`http(s)://...` (read-only; aiohttp, the `[remote]` extra).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from loop.data.prepare import PREPARED_FEATURES
from loop.data.sources import DataError
from loop.extras import require

INDEX_FILE = "index.json"
SHARD_FORMAT = "whisper-loop-shards"
SHARD_FORMAT_VERSION = 1
ROW_GROUP_ROWS = 16  # a reader seeks to a row by reading at most this many rows before it
COLUMNS = ("audio", "audio_scale", "labels", "duration", "utterances", "segments", "timestamped", "implausible",
           "id", "audio_path", "text", "client_id")
"""What a shard holds of each prepared row (`loop.data.prepare.PREPARED_FEATURES`, less the skip columns)."""


class ShardError(DataError):
    """A shard that cannot be used: missing (the run stops), or corrupt (its rows are skipped and counted)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.parquet"


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a local path or URL; http(s) needs aiohttp (`[remote]`)."""
    import fsspec

    if url.startswith(("http://", "https://")):
        require("aiohttp", "remote", "reading shards over HTTP")
    return fsspec.core.url_to_fs(url)


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the index lists it."""

    name: str
    rows: int
    utterances: int
    seconds: float
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardIndex:
    """A split's `index.json`: its shards in order, the preparation settings and report."""

    url: str
    """The split's folder."""
    split: str
    shards: tuple[ShardInfo, ...]
    settings: dict
    """What the rows were prepared with; `settings["tokenizer"]` and `settings["prefix"]` must match the run's."""
    report: dict
    """The preparation's report: read, kept, skipped by reason (`loop.data.prepare.SplitReport.as_dict`)."""

    @property
    def rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def hours(self) -> float:
        return sum(shard.seconds for shard in self.shards) / 3600

    def to_json(self) -> dict:
        return {"format": SHARD_FORMAT, "version": SHARD_FORMAT_VERSION, "split": self.split,
                "rows": self.rows, "hours": round(self.hours, 4), "bytes": sum(s.bytes for s in self.shards),
                "shards": [asdict(shard) for shard in self.shards], "settings": self.settings, "report": self.report}


def read_index(url: str) -> ShardIndex:
    """The index of the split folder `url`; a missing or foreign one is a DataError naming it."""
    fs, path = filesystem(url)
    where = join(url, INDEX_FILE)
    try:
        with fs.open(join(path, INDEX_FILE), "rb") as file:
            values = json.loads(file.read())
    except FileNotFoundError as error:
        raise DataError(f"{where} not found: write the shards with scripts/prepare_data.py --shards") from error
    except (OSError, ValueError) as error:
        raise DataError(f"{where}: unreadable ({error})") from error
    if not isinstance(values, dict) or values.get("format") != SHARD_FORMAT:
        raise DataError(f"{where} is not a {SHARD_FORMAT} index")
    if values.get("version") != SHARD_FORMAT_VERSION:
        raise DataError(f"{where}: format version {values.get('version')}, this version reads "
                        f"{SHARD_FORMAT_VERSION}: write the shards again")
    shards = tuple(ShardInfo(**shard) for shard in values["shards"])
    return ShardIndex(url, values["split"], shards, values["settings"], values["report"])


def check_settings(index: ShardIndex, tokenizer) -> None:
    """The shards' labels must be this run's tokens: same tokenizer, same label prefix."""
    expected = tokenizer_fingerprint(tokenizer)
    if index.settings.get("tokenizer") != expected["tokenizer"]:
        raise DataError(f"{index.url}: written with another tokenizer than this run's model's; write the shards "
                        "again with this model (scripts/prepare_data.py --shards)")
    if index.settings.get("prefix") != expected["prefix"]:
        raise DataError(f"{index.url}: labels start with tokens {index.settings.get('prefix')}, this run's with "
                        f"{expected['prefix']} (another language or task?); write the shards again")


def tokenizer_fingerprint(tokenizer) -> dict:
    return {"tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16],
            "prefix": list(tokenizer.prefix_tokens)}


def file_sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard_table(table: pa.Table, local_path: str) -> None:
    """A shard's rows to a local Parquet file: row groups of `ROW_GROUP_ROWS`, page checksums, zstd."""
    pq.write_table(table, local_path, row_group_size=ROW_GROUP_ROWS, write_page_checksum=True,
                   compression="zstd")


class ShardReader:
    """Reads row ranges of one split's shards, opening each file once and, with `verify`, checking its size and
    SHA-256 against the index before its first read. Missing files raise `ShardError("missing_shard")` (stop the
    run); damaged ones `ShardError("corrupt_shard")` (skip its rows)."""

    def __init__(self, index: ShardIndex, verify: bool = True):
        self.index, self.verify = index, verify
        self.fs, self.root = filesystem(index.url)
        self.files: dict[str, pq.ParquetFile] = {}

    def _open(self, shard: ShardInfo) -> pq.ParquetFile:
        if shard.name in self.files:
            return self.files[shard.name]
        path, where = join(self.root, shard.name), join(self.index.url, shard.name)
        try:
            size = self.fs.size(path)
        except FileNotFoundError:
            size = None
        if size is None:
            raise ShardError("missing_shard", f"{where}: shard listed in {INDEX_FILE} is missing")
        if size != shard.bytes:
            raise ShardError("corrupt_shard", f"{where}: {size} bytes, {INDEX_FILE} says {shard.bytes}")
        if self.verify and (found := file_sha256(self.fs, path)) != shard.sha256:
            raise ShardError("corrupt_shard", f"{where}: checksum mismatch (SHA-256 {found[:16]}..., "
                                              f"{INDEX_FILE} says {shard.sha256[:16]}...)")
        try:
            opened = pq.ParquetFile(self.fs.open(path, "rb"), page_checksum_verification=True)
        except (OSError, pa.ArrowException) as error:
            raise ShardError("corrupt_shard", f"{where}: unreadable ({error})") from error
        self.files[shard.name] = opened
        return opened

    def read(self, shard: ShardInfo, start: int, stop: int, columns=COLUMNS) -> pa.Table:
        """Rows [start, stop) of `shard`, reading only the row groups that hold them."""
        file = self._open(shard)
        groups, first, offset = [], None, 0
        for group in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if offset < stop and offset + rows > start:
                groups.append(group)
                first = offset if first is None else first
            offset += rows
        try:
            table = file.read_row_groups(groups, columns=list(columns)) if groups else None
        except (OSError, pa.ArrowException) as error:
            raise ShardError("corrupt_shard", f"{join(self.index.url, shard.name)}: unreadable ({error})") from error
        if table is None or offset != shard.rows:
            raise ShardError("corrupt_shard", f"{join(self.index.url, shard.name)}: holds {offset} rows, "
                                              f"{INDEX_FILE} says {shard.rows}")
        return table.slice(start - first, stop - start)


def read_split(index: ShardIndex, verify: bool = True) -> datasets.Dataset:
    """All rows of a split as one in-memory table (evaluation splits; training without `data.streaming`).
    Here every shard must be whole: a damaged one stops with its name."""
    reader = ShardReader(index, verify)
    tables = [reader.read(shard, 0, shard.rows) for shard in index.shards if shard.rows]
    if not tables:
        return datasets.Dataset.from_dict({name: [] for name in COLUMNS},
                                          features=datasets.Features({n: PREPARED_FEATURES[n] for n in COLUMNS}))
    return datasets.Dataset(pa.concat_tables(tables))
