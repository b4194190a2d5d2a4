"""What the demo page shows besides the model: its name (from the model card), clips to click (a Common Voice
test split, by default the synthetic corpus shipped in assets/), and a note for a WAV whose header lies."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import yaml

from loop.config import HUB_ID, PROJECT_ROOT
from loop.data.sources import DataError, SkipLog, find_common_voice_dir, read_common_voice_split

SHIPPED_CORPUS = PROJECT_ROOT / "assets" / "cv-corpus-17.0-synthetic"
EXAMPLE_CLIPS = 5  # clips offered on the page
SNIPPET_MODEL = re.compile(r'pipeline\([^)]*model="([^"]+)"')  # the card's "How to use" names what to load
HEADER_BYTES = 4096  # a WAV's chunks before `data` (fmt, LIST, ...) fit in this
MISSING_S = 1.0  # a header may round its sizes; more than this much audio missing is a lie worth saying


def card_name(model_dir: str | Path) -> str:
    """The model as its card names it: the Hub repository the card's snippet loads when it names one (a run with
    `train.hub_model_id`), else the card's model-index name, else the folder's name (the run's, for a `best/`
    folder); a Hub id given instead of a folder is its own name."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return str(model_dir)
    fallback = folder.resolve().parent.name if folder.resolve().name == "best" else folder.resolve().name
    if folder.resolve().parent.name == "checkpoints":  # a run's step_N: the run and the step
        return f"{folder.resolve().parent.parent.name} {folder.resolve().name}"
    card = folder / "README.md"
    if not card.is_file():
        return fallback
    text = card.read_text(encoding="utf-8", errors="replace")
    loaded = SNIPPET_MODEL.search(text)
    if loaded and "/" in loaded.group(1) and HUB_ID.match(loaded.group(1)) and not Path(loaded.group(1)).exists():
        return loaded.group(1)
    parts = text.split("---", 2)
    try:
        front = yaml.safe_load(parts[1]) if text.startswith("---") and len(parts) == 3 else None
        name = front["model-index"][0]["name"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return fallback
    return str(name) if name else fallback


def example_clips(source: str | Path = "", split: str = "test", count: int = EXAMPLE_CLIPS) -> list[tuple[str, str]]:
    """(audio path, reference transcript) of the first `count` clips of a Common Voice folder's `split` that
    exist on disk; `source` "" is the shipped synthetic corpus. A folder that is not one gives no clips."""
    try:
        locale_dir = find_common_voice_dir(str(source or SHIPPED_CORPUS))
        rows = read_common_voice_split(locale_dir, split, SkipLog())
    except (DataError, OSError):
        return []
    return [(row["audio_path"], row["text"]) for row in rows if row.get("audio_path")
            and Path(row["audio_path"]).is_file()][:count]


def wav_header_note(path: str | Path) -> str | None:
    """For a WAV whose `data` chunk claims more audio than the file holds (a recorder killed mid-file, a crafted
    upload): what it claims and what is there. libsndfile reads such a file as far as it goes; this says so. None
    for any other file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError:
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    byte_rate, position = 0, 12
    while position + 8 <= len(head):
        chunk, length = head[position:position + 4], struct.unpack("<I", head[position + 4:position + 8])[0]
        if chunk == b"fmt " and position + 16 <= len(head):
            byte_rate = struct.unpack("<I", head[position + 16:position + 20])[0]  # after format, channels, rate
        if chunk == b"data":
            if not byte_rate:
                return None
            claimed, held = length / byte_rate, max(0, size - position - 8) / byte_rate
            if claimed - held <= MISSING_S:
                return None
            return (f"{path.name}: its header claims {_duration(claimed)} of audio, but the file holds "
                    f"{_duration(held)}; transcribing the {_duration(held)} it holds.")
        position += 8 + length + (length % 2)  # chunks are padded to an even size
    return None


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"
