"""Data sources -> one table of utterances: a Common Voice release folder, a Hub dataset, or manifest files.

Every source yields the same columns, so preparation never looks at where rows came from:
`id`, `audio_path` (str, may be empty), `audio_bytes` (bytes or None), `text`, `client_id` (speaker, may be empty)
and `origin` (`train.tsv row 12`, for messages). Rows that cannot be read are skipped and counted in a `SkipLog`
under a short reason, with a message naming the file and row; `strict` turns the first one into an error.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections import Counter
from pathlib import Path

import datasets

from loop.config import SourceConfig, resolve_path

CV_REQUIRED_COLUMNS = ("path", "sentence")
MANIFEST_SUFFIXES = (".tsv", ".csv", ".jsonl")
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
MAX_MESSAGES_PER_REASON = 20  # enough to find the files at fault without flooding the report


class DataError(ValueError):
    """A source that cannot be used at all (wrong path, missing column, unreachable dataset), or a bad row in
    strict mode."""


def strict_error(reason: str, message: str) -> DataError:
    """The error for the first bad row when `data.strict` is on: the row's message, its reason and the way out."""
    return DataError(f"{message} [{reason}] (data.strict is on; turn it off to skip and count bad rows)")


class SkipLog:
    """Counts skipped rows by reason and keeps the first messages for each; raises in strict mode."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.messages: dict[str, list[str]] = {}

    def add(self, reason: str, message: str, count: int = 1) -> None:
        """Counts `count` rows skipped for `reason` (one message for them all)."""
        if self.strict:
            raise strict_error(reason, message)
        self.counts[reason] += count
        kept = self.messages.setdefault(reason, [])
        if len(kept) < MAX_MESSAGES_PER_REASON:
            kept.append(message)

    def as_dict(self) -> dict:
        return {"skipped": dict(self.counts), "messages": self.messages}

    def merge(self, values: dict) -> None:
        """Adds another log's `as_dict()` (a shard's, another process's) to this one, without raising."""
        for reason, count in values.get("skipped", {}).items():
            self.counts[reason] += count
        for reason, messages in values.get("messages", {}).items():
            kept = self.messages.setdefault(reason, [])
            kept += messages[: MAX_MESSAGES_PER_REASON - len(kept)]


def load_utterances(config: SourceConfig, split: str, skips: SkipLog, labelled: bool = True) -> datasets.Dataset:
    """All rows of one split of the configured source, as the common utterance table; with `labelled` false a
    manifest may lack the transcript column (unlabelled audio, for pseudo-labelling: `text` is then "")."""
    if config.source == "common_voice":
        rows = read_common_voice_split(find_common_voice_dir(config.path, config.locale), split, skips)
    elif config.source == "manifest":
        rows = read_manifest(find_manifest(config.path, split), config.audio_column, config.text_column, skips,
                             labelled)
    else:
        return load_hub_split(config, split)
    # Column-wise: `Dataset.from_list([])` cannot build an empty table (a header-only TSV, every row skipped).
    columns = {name: [row[name] for row in rows] for name in UTTERANCE_FEATURES}
    return datasets.Dataset.from_dict(columns, features=UTTERANCE_FEATURES)


UTTERANCE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "audio_path": datasets.Value("string"),
        "audio_bytes": datasets.Value("binary"),
        "text": datasets.Value("string"),
        "client_id": datasets.Value("string"),
        "origin": datasets.Value("string"),
    }
)


def find_common_voice_dir(path: str, locale: str = "hi") -> Path:
    """The folder holding `train.tsv` and `clips/`: `path` itself, or below a `cv-corpus-*` root."""
    root = resolve_path(path)
    if not root.is_dir():
        raise DataError(f"data.path {path!r}: no such folder (expected an extracted Common Voice release)")
    if _is_cv_locale_dir(root):
        return root
    candidates = [d for d in sorted(root.glob("*")) + sorted(root.glob("*/*")) if d.is_dir() and _is_cv_locale_dir(d)]
    preferred = [d for d in candidates if d.name == locale]
    if preferred:
        return preferred[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(
            f"data.path {path!r}: no folder with train.tsv and clips/ found here or two levels below; "
            "point it at the extracted cv-corpus-* folder or its <locale>/ folder"
        )
    names = ", ".join(str(d.relative_to(root)) for d in candidates)
    raise DataError(f"data.path {path!r} holds several locales ({names}); set data.locale or point at one of them")


def _is_cv_locale_dir(folder: Path) -> bool:
    return (folder / "train.tsv").is_file() and (folder / "clips").is_dir()


def read_common_voice_split(cv_dir: Path, split: str, skips: SkipLog) -> list[dict]:
    """Rows of `<cv_dir>/<split>.tsv`, tab-separated with no quote handling (sentences contain quote marks).

    Columns are picked by header name: only `path` and `sentence` are required, because headers differ between
    releases (v11-v13 lack `sentence_id`, `sentence_domain` and `variant`; old ones say `accent`).
    """
    tsv = cv_dir / f"{split}.tsv"
    if not tsv.is_file():
        available = ", ".join(sorted(p.stem for p in cv_dir.glob("*.tsv")))
        raise DataError(f"{tsv}: split {split!r} not found (this folder has: {available})")
    lines = _without_bom(tsv.read_bytes()).split(b"\n")
    header = lines[0].decode("utf-8", errors="replace").rstrip("\r").split("\t")
    missing = [name for name in CV_REQUIRED_COLUMNS if name not in header]
    if missing:
        raise DataError(f"{tsv}: missing required column(s) {', '.join(missing)} (header has: {', '.join(header)})")
    position = {name: header.index(name) for name in header}
    rows, seen_paths = [], set()
    for number, raw in enumerate(lines[1:], start=2):
        where = f"{tsv.name} row {number}"
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as error:
            skips.add("bad_tsv_row", f"{tsv} row {number}: invalid UTF-8 ({error.reason} at byte {error.start})")
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            fields += [""] * (len(header) - len(fields))  # trailing empty columns are often stripped by editors
        if len(fields) > len(header):
            skips.add("bad_tsv_row", f"{tsv} row {number}: {len(fields)} fields but the header has {len(header)}")
            continue
        clip = fields[position["path"]].strip()
        if not clip:
            skips.add("bad_tsv_row", f"{tsv} row {number}: empty path")
            continue
        if clip in seen_paths:
            skips.add("duplicate_row", f"{tsv} row {number}: clip {clip} listed again")
            continue
        seen_paths.add(clip)
        rows.append(
            {
                "id": Path(clip).stem,
                "audio_path": str(cv_dir / "clips" / clip),
                "audio_bytes": None,
                "text": fields[position["sentence"]],
                "client_id": fields[position["client_id"]] if "client_id" in position else "",
                "origin": where,
            }
        )
    return rows


def _without_bom(content: bytes) -> bytes:
    """Spreadsheet programs and Windows editors start UTF-8 files with a byte-order mark; left in place it becomes
    part of the first column's name, and `client_id` (or a manifest's audio column) would silently go missing."""
    return content[len(codecs.BOM_UTF8):] if content.startswith(codecs.BOM_UTF8) else content


def find_manifest(path: str, split: str) -> Path:
    """`split` as a file path, or `<path>/<split>.tsv|.csv|.jsonl`."""
    folder = resolve_path(path)
    direct = resolve_path(split)
    if direct.is_file():
        return direct
    if folder.is_file():
        raise DataError(f"data.path {path!r} is a file: for manifests point data.path at their folder, or give the file as the split")
    for suffix in MANIFEST_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    raise DataError(f"no manifest for split {split!r} in {folder} (expected {split}.tsv, {split}.csv or {split}.jsonl)")


def read_manifest(manifest: Path, audio_column: str, text_column: str, skips: SkipLog,
                  labelled: bool = True) -> list[dict]:
    """Rows of a CSV, TSV or JSONL manifest; audio paths are relative to the manifest's folder. Without
    `labelled`, a row may lack `text_column` (its text is then "")."""
    records = _manifest_records(manifest, skips)
    rows, seen_paths = [], set()
    for number, record in records:
        where = f"{manifest.name} row {number}"
        if audio_column not in record or (labelled and text_column not in record):
            missing = [c for c in (audio_column, text_column) if c not in record]
            skips.add("bad_manifest_row", f"{manifest} row {number}: no {' or '.join(missing)} column (set data.audio_column / data.text_column)")
            continue
        clip = str(record[audio_column] or "").strip()
        if not clip:
            skips.add("bad_manifest_row", f"{manifest} row {number}: empty {audio_column}")
            continue
        if clip in seen_paths:
            skips.add("duplicate_row", f"{manifest} row {number}: {clip} listed again")
            continue
        seen_paths.add(clip)
        audio = Path(clip) if Path(clip).is_absolute() else manifest.parent / clip
        rows.append(
            {
                "id": str(record.get("id") or Path(clip).stem),
                "audio_path": str(audio),
                "audio_bytes": None,
                "text": str(record.get(text_column) or ""),
                "client_id": str(record.get("client_id") or record.get("speaker_id") or ""),
                "origin": where,
            }
        )
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """A CSV manifest (audio, sentence, client_id) that `read_manifest` reads back: rows as `read_*` return them
    (`audio_path`, `text`, `client_id`). Audio paths are written as given (absolute ones stay absolute)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["audio", "sentence", "client_id"])
        writer.writerows([row["audio_path"], row["text"], row.get("client_id") or ""] for row in rows)
    return path


def _manifest_records(manifest: Path, skips: SkipLog) -> list[tuple[int, dict]]:
    """(line number, record) pairs; lines that are not UTF-8 or not a record are skipped and counted."""
    lines = []
    for number, raw in enumerate(_without_bom(manifest.read_bytes()).split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            lines.append((number, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as error:
            skips.add("bad_manifest_row", f"{manifest} row {number}: invalid UTF-8 ({error.reason} at byte {error.start})")
    if manifest.suffix == ".jsonl":
        records = []
        for number, line in lines:
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {JSON_TYPES.get(type(record), 'value')}")
            except ValueError as error:
                skips.add("bad_manifest_row", f"{manifest} row {number}: not a JSON object ({error})")
                continue
            records.append((number, record))
        return records
    if not lines:
        return []
    delimiter = "\t" if manifest.suffix == ".tsv" else ","
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    header = next(csv.reader([lines[0][1]], delimiter=delimiter, quoting=quoting))
    records = []
    for number, line in lines[1:]:
        fields = next(csv.reader([line], delimiter=delimiter, quoting=quoting))
        if len(fields) != len(header):
            skips.add("bad_manifest_row", f"{manifest} row {number}: {len(fields)} fields but the header has {len(header)}")
            continue
        records.append((number, dict(zip(header, fields))))
    return records


def hub_split_label(config: SourceConfig, split: str) -> str:
    """`google/fleurs (hi_in) split 'train'`, for messages."""
    return config.dataset_name + (f" ({config.dataset_config})" if config.dataset_config else "") + f" split {split!r}"


def split_location(config: SourceConfig, split: str) -> str:
    """Where one split's rows come from, for messages: its TSV or manifest file, or the Hub dataset and split."""
    if config.source == "common_voice":
        return str(find_common_voice_dir(config.path, config.locale) / f"{split}.tsv")
    if config.source == "manifest":
        return str(find_manifest(config.path, split))
    return hub_split_label(config, split)


def load_hub_split(config: SourceConfig, split: str) -> datasets.Dataset:
    """One split of a Hub dataset (or a local dataset folder), mapped to the utterance table without decoding."""
    name = config.dataset_name
    label = hub_split_label(config, split)
    try:
        dataset = datasets.load_dataset(
            name, config.dataset_config or None, split=split, revision=config.dataset_revision or None
        )
    except Exception as error:  # network, auth, missing split: all end here, with one readable message
        text = str(error)
        if "script" in text.lower() and "supported" in text.lower():
            raise DataError(
                f"cannot load {label}: it is a script-based dataset, which datasets 5 no longer runs; "
                "use its Parquet conversion with --data.dataset_revision=refs/convert/parquet"
            ) from error
        raise DataError(f"cannot load {label}: {type(error).__name__}: {text.splitlines()[0] if text else ''}") from error
    missing = [c for c in (config.audio_column, config.text_column) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{label}: no column {', '.join(missing)} (columns: {', '.join(dataset.column_names)}); "
            "set data.audio_column / data.text_column"
        )
    if isinstance(dataset.features[config.audio_column], datasets.Audio):
        # Keep the encoded bytes: datasets 5 would decode through torchcodec and FFmpeg; we decode with soundfile.
        dataset = dataset.cast_column(config.audio_column, datasets.Audio(decode=False))
    speaker = next((c for c in ("client_id", "speaker_id") if c in dataset.column_names), None)
    return dataset.map(
        _hub_row,
        fn_kwargs={"audio_column": config.audio_column, "text_column": config.text_column, "speaker": speaker, "split": split},
        with_indices=True,
        remove_columns=dataset.column_names,
        features=UTTERANCE_FEATURES,
        desc=f"reading {label}",
    )


def _hub_row(row: dict, index: int, audio_column: str, text_column: str, speaker: str | None, split: str) -> dict:
    audio = row[audio_column]
    if isinstance(audio, dict):
        audio_bytes, audio_path = audio.get("bytes"), audio.get("path") or ""
    elif isinstance(audio, (bytes, bytearray)):
        audio_bytes, audio_path = bytes(audio), ""
    else:
        audio_bytes, audio_path = None, str(audio or "")
    return {
        "id": str(row.get("id") or Path(audio_path).stem or f"{split}-{index}"),
        "audio_path": audio_path,
        "audio_bytes": audio_bytes,
        "text": str(row[text_column] or ""),
        "client_id": str(row[speaker]) if speaker else "",
        "origin": f"{split} row {index}",
    }
