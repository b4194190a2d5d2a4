"""An interrupted data preparation, for real: `scripts/prepare_data.py` killed with SIGKILL inside the
`datasets.map` of the training split, and cache files cut short under their final names (what a power loss can
leave of files that were renamed but never fsynced). The next preparation reuses none of it, fails on none of it,
and prepares what it must again."""

from __future__ import annotations

import os
import time

from loop.data.cache_files import marker_path
from tests.helpers import kill_9_when, load_script, script_command

ARGS = ("--config", "quickstart", "--data.num_proc=1")
KEPT = ("train: 301 of 301 utterances kept", "selection: 37 of 37 utterances kept", "test: 30 of 30 utterances kept")


def prepare_in_process(cache_dir, output_dir, capsys) -> str:
    code = load_script("prepare_data").main([*ARGS, f"--data.cache_dir={cache_dir}", "--output_dir", str(output_dir)])
    output = capsys.readouterr()
    assert code == 0, output.out[-2000:] + output.err[-2000:]
    return output.out


def train_files(cache_dir):
    return sorted(path.name for path in cache_dir.glob("train-*"))


def test_kill_9_inside_the_map_leaves_nothing_that_is_reused(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    kill_9_when(script_command("prepare_data", *ARGS, f"--data.cache_dir={cache_dir}", "--output_dir",
                               tmp_path / "out"),
                lambda: [p for p in cache_dir.glob("tmp*") if p.stat().st_size > 100_000])  # the map is writing
    (temporary,) = cache_dir.glob("tmp*")  # what the killed map had written
    assert train_files(cache_dir) == []
    hours_ago = time.time() - 2 * 3600
    os.utime(temporary, (hours_ago, hours_ago))  # as if the next run came two hours later

    output = prepare_in_process(cache_dir, tmp_path / "out", capsys)
    assert all(line in output for line in KEPT), output
    assert not temporary.exists()  # the killed preparation's leftover is gone
    (train,) = [name for name in train_files(cache_dir) if name.endswith(".arrow")]
    assert marker_path(cache_dir, train.removesuffix(".arrow")).is_file()


def test_cache_files_cut_short_are_prepared_again(tmp_path, capsys):
    """A cache file cut short under its final name: without a marker (renamed, then the machine lost power before
    the marker was written), and with its marker but a different size. Before completion markers the next
    preparation failed on it: `Expected to be able to read 1528176 bytes for message body, got 939992`."""
    cache_dir = tmp_path / "cache"
    prepare_in_process(cache_dir, tmp_path / "out", capsys)
    (train,) = [path for path in cache_dir.glob("train-*.arrow")]
    size = train.stat().st_size
    for drop_marker in (True, False):
        with open(train, "r+b") as handle:
            handle.truncate(size // 3)
        if drop_marker:
            marker_path(cache_dir, train.stem).unlink()
        output = prepare_in_process(cache_dir, tmp_path / "out", capsys)
        assert all(line in output for line in KEPT), output
        assert train.stat().st_size == size
