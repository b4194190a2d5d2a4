"""Shards and streaming: shards written once (and resumed after kill -9), read back equal to the cached path's
rows, over HTTP too; streamed epochs that cover every row once over processes and workers, resume at the exact
batch, mix two streams at their weights, and skip or stop on damaged shards as documented."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from dataclasses import replace

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from loop.config import ConfigError
from loop.data.collator import SpeechSeq2SeqCollator
from loop.data.shard_splits import write_shards
from loop.data.shards import INDEX_FILE, ShardIndex, ShardInfo, read_index, read_split, write_shard_table
from loop.data.sources import DataError
from loop.data.splits import build_datasets
from loop.data.streaming import StreamLoader, StreamPlan, StreamPosition, StreamSource, row_key
from loop.model.loading import load_processor
from loop.run.checkpoints import list_checkpoints
from loop.train import fit, setup
from tests.helpers import (
    PROJECT,
    StopAt,
    child_env,
    kill_9_when,
    reset_accelerate,
    run_config,
    script_command,
    tensorboard_scalars,
)

SMALL = ("--data.max_train_samples=96", "--data.selection_size=12", "--data.max_eval_samples=8")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model_dir, processor, max_target_positions):
    """(shard folder, the config that wrote it): 96 training utterances in 8 shards of 12, selection, test."""
    folder = tmp_path_factory.mktemp("shards")
    config = run_config(folder / "run", tiny_model_dir, folder / "cache", *SMALL)
    write_shards(config, processor, max_target_positions, str(folder / "shards"), shard_utterances=12)
    return folder / "shards", config


def shard_config(tmp_path, model_dir, folder, *overrides):
    return run_config(tmp_path / "run", model_dir, tmp_path / "cache", "--data.source=shards",
                      f"--data.path={folder}", *overrides)


def columns(table, names=("id", "labels", "audio", "audio_scale", "duration")):
    return {name: [np.asarray(value).tolist() for value in table[name]] for name in names}


def test_shards_read_back_equal_to_the_cached_path(shards, tmp_path, tiny_model_dir, processor, max_target_positions):
    folder, config = shards
    cached = build_datasets(config, processor, max_target_positions)
    sharded = build_datasets(shard_config(tmp_path, tiny_model_dir, folder), processor, max_target_positions)
    for split in ("train", "selection", "test"):
        assert columns(getattr(sharded, split)) == columns(getattr(cached, split)), split
    assert sharded.reports["train"].as_dict()["kept"] == cached.reports["train"].as_dict()["kept"] == 96
    capped = build_datasets(shard_config(tmp_path, tiny_model_dir, folder, "--data.max_eval_samples=3",
                                         "--data.no_speech_fraction=0.1"), processor, max_target_positions)
    assert len(capped.test) == len(capped.selection) == 3
    assert len(capped.train) == len(cached.train) + capped.reports["train"].no_speech > len(cached.train)
    index = read_index(str(folder / "train"))
    assert [shard.rows for shard in index.shards] == [12] * 8
    # other tools read the shards as they are, as docs/shards-and-streaming.md says
    stream = datasets.load_dataset("parquet", data_files=str(folder / "train" / "*.parquet"), streaming=True)
    assert [row["id"] for row in stream["train"]] == cached.train["id"]
    assert index.hours == pytest.approx(sum(cached.train["duration"]) / 3600, abs=1e-3)


class RangeRequests(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers byte-range requests, as object stores and the Hub's do."""

    def do_HEAD(self, body: bool = False):
        try:
            data = open(self.translate_path(self.path), "rb").read()  # noqa: SIM115 - small test files
        except OSError:
            return self.send_error(404)
        first, _, last = self.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206 if "Range" in self.headers else 200)
        if "Range" in self.headers:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end + 1 - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end + 1])

    def do_GET(self):
        self.do_HEAD(body=True)

    def log_message(self, *args):
        pass


def test_shards_are_read_over_http(shards):
    folder, _ = shards
    handler = functools.partial(RangeRequests, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = read_index(f"http://127.0.0.1:{server.server_port}/train")
        assert columns(read_split(remote)) == columns(read_split(read_index(str(folder / "train"))))
    finally:
        server.shutdown()


def test_shards_are_written_to_and_read_from_a_filesystem_that_is_not_local(shards, tiny_model_dir, processor,
                                                                             max_target_positions):
    """fsspec's in-memory filesystem stands in for an object store: no rename in place, whole-object writes."""
    folder, config = shards
    written = write_shards(config, processor, max_target_positions, "memory://shards", shard_utterances=12)
    assert written["train"].url == "memory://shards/train"
    local = read_split(read_index(str(folder / "train")))
    assert columns(read_split(read_index("memory://shards/train"))) == columns(local)


def fake_index(name: str, rows: list[int]) -> ShardIndex:
    shards = tuple(ShardInfo(f"shard-{i:05d}.parquet", n, n, n, 0, "") for i, n in enumerate(rows))
    return ShardIndex(name, "train", shards, {}, {})


def epoch_rows(plan: StreamPlan, epoch: int) -> list[tuple[int, int, int]]:
    return [(s.source, s.shard, row) for w in range(plan.window_count()) for s in plan.window_segments(epoch, w)
            for row in range(s.start, s.stop)]


def test_every_row_once_per_epoch_over_processes_and_windows():
    sources = (StreamSource("train", fake_index("a", [5, 0, 17, 9, 13]), 0.75),
               StreamSource("train.en", fake_index("b", [4, 7]), 0.25))
    plans = [StreamPlan(sources, seed=3, batch_size=3, window_rows=7, process_index=p, num_processes=2)
             for p in range(2)]
    main_rows = sorted((0, shard, row) for shard, n in enumerate([5, 0, 17, 9, 13]) for row in range(n))
    mixed_seen = []
    for epoch in range(3):
        rows = [row for plan in plans for row in epoch_rows(plan, epoch)]
        assert sorted(row for row in rows if row[0] == 0) == main_rows  # each of the data source's rows once
        mixed = [row for row in rows if row[0] == 1]
        assert len(mixed) == round(0.25 * 44 / 0.75) == 15  # the mixed source's quota: its share of the epoch
        mixed_seen += mixed
    assert len(set(mixed_seen[:11])) == 11  # without replacement: all 11 rows before any again
    first = [plans[0].window_segments(epoch, 0) for epoch in range(2)]
    assert first[0] != first[1]  # the shard order is drawn anew each epoch


def streamed(folder, *, processes=1, process=0, workers=0, buffer=20, group=False, share=None, batch=4, **kw):
    sources = (StreamSource("train", read_index(str(folder / "train")), 1.0),)
    if share:
        sources = (replace(sources[0], share=1 - share),
                   StreamSource("train.again", read_index(str(folder / "train")), share))
    plan = StreamPlan(sources, seed=5, batch_size=batch, window_rows=buffer, group_by_length=group,
                      process_index=process, num_processes=processes)
    return StreamLoader(plan, SpeechSeq2SeqCollator(50258), num_workers=workers, **kw)


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator)["index"].tolist() for _ in range(count)]


def test_resume_gives_the_uninterrupted_batches_with_any_number_of_workers(shards):
    folder, _ = shards
    straight = take(streamed(folder, group=True), 30)  # 96 rows in batches of 4: past the first epoch
    first = streamed(folder, group=True, workers=2)
    assert take(first, 13) == straight[:13]  # two workers hand the windows back in order
    saved = first.state_dict()
    resumed = streamed(folder, group=True, workers=1)
    resumed.load_state_dict([saved])
    assert take(resumed, 17) == straight[13:]
    with pytest.raises(DataError, match="on 2 processes.*--num_processes 2"):
        streamed(folder).load_state_dict([saved, saved])


def test_two_streams_mix_at_their_weights_over_an_epoch(shards):
    folder, _ = shards
    loader = streamed(folder, share=0.25, buffer=30)
    epoch_batches = []
    for batch in loader:
        epoch_batches.append(batch["index"].tolist())
        if loader.position.epoch == 1:  # that was the first epoch's last batch
            break
    sources = [key >> 48 for batch in epoch_batches for key in batch]
    assert sources.count(0) == 96 and sources.count(1) == 32  # 96 / 0.75 rows an epoch, a quarter mixed in
    per_batch = [sum(key >> 48 for key in batch) / len(batch) for batch in epoch_batches]
    assert 0.05 < np.mean(per_batch[:len(per_batch) // 2]) < 0.45  # mixed through the epoch, not at its end


def test_two_processes_with_two_workers_each_read_every_row_once_per_epoch(shards, tmp_path):
    """accelerate launch, 2 CPU processes (gloo), 2 DataLoader workers each, over 8 shards."""
    folder, _ = shards
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=2", "--num_machines=1",
               "--mixed_precision=no", "--dynamo_backend=no", "--multi_gpu", str(PROJECT / "tests" / "stream_worker.py"),
               str(folder), str(tmp_path / "keys.json")]
    done = subprocess.run(command, env=child_env(), cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads((tmp_path / "keys.json").read_text())
    assert len(first) == len(second) == 48 and not set(first) & set(second)
    assert sorted(first + second) == sorted(row_key(0, shard, row) for shard in range(8) for row in range(12))


def damaged_copy(folder, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    return copy


def test_a_corrupt_shard_is_skipped_and_counted_a_missing_one_stops(shards, tmp_path):
    folder, _ = shards
    copy = damaged_copy(folder, tmp_path)
    index = read_index(str(copy / "train"))
    damaged = copy / "train" / index.shards[1].name
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # inside the pages: checksum and page CRCs both fail
    damaged.write_bytes(bytes(data))
    for verify in (True, False):
        loader = streamed(copy, buffer=100, verify=verify)
        batches = take(loader, 16)
        shards_read = {(key >> 24) & 0xFFFFFF for batch in batches for key in batch}
        assert shards_read == {0, 2, 3, 4, 5, 6, 7}
        assert loader.skips.counts == {"corrupt_shard": 12}
        (message,) = loader.skips.messages["corrupt_shard"]
        assert index.shards[1].name in message and ("SHA-256" in message) == verify
    (copy / "train" / index.shards[2].name).unlink()
    with pytest.raises(DataError, match=f"{index.shards[2].name}: shard listed in {INDEX_FILE} is missing"):
        take(streamed(copy, buffer=100), 16)


def test_a_corrupt_row_is_skipped_and_counted(shards, tmp_path):
    folder, _ = shards
    copy = damaged_copy(folder, tmp_path)
    index = read_index(str(copy / "train"))
    path = copy / "train" / index.shards[0].name
    table = pq.read_table(path)
    durations = table.column("duration").to_pylist()
    durations[3] += 1.0  # its audio no longer matches its duration
    write_shard_table(table.set_column(table.schema.get_field_index("duration"), "duration",
                                       [np.array(durations, np.float32)]), str(path))
    values = json.loads((copy / "train" / INDEX_FILE).read_text())
    values["shards"][0]["bytes"] = path.stat().st_size
    (copy / "train" / INDEX_FILE).write_text(json.dumps(values))
    loader = streamed(copy, buffer=100, verify=False)
    assert sum(len(batch) for batch in take(loader, 24)) == 95  # one window of the epoch's 96 rows, less one
    assert loader.skips.counts == {"corrupt_row": 1}
    assert f"{index.shards[0].name} row 3" in loader.skips.messages["corrupt_row"][0]


def test_streaming_options_are_checked(shards, tmp_path, tiny_model_dir):
    folder, _ = shards
    with pytest.raises(ConfigError, match="data.streaming needs data.source=shards"):
        run_config(tmp_path, tiny_model_dir, tmp_path, "--data.streaming=true")
    with pytest.raises(ConfigError, match="per_device_train_batch_size=auto is not available with data.streaming"):
        shard_config(tmp_path, tiny_model_dir, folder, "--data.streaming=true",
                     "--train.per_device_train_batch_size=auto")
    with pytest.raises(ConfigError, match=r"data.mix\[0\] \(en\): data.streaming mixes shard folders only"):
        shard_config(tmp_path, tiny_model_dir, folder, "--data.streaming=true",
                     f"--data.mix=[{{name: en, weight: 0.2, path: {folder}}}]")


def test_a_streamed_run_stopped_and_resumed_matches_an_uninterrupted_one(tmp_path, fast_model):
    """Streaming training with two DataLoader workers: stopped inside the second epoch and resumed, the per-step
    losses and final weights are bitwise those of a run straight through, and data_report.json has the stream."""
    folder = tmp_path / "shards"  # written with this model's tokenizer, which the shards' labels must match
    config = run_config(tmp_path / "prepare", fast_model, tmp_path / "cache", *SMALL)
    write_shards(config, load_processor(str(fast_model), "hindi", "transcribe"), 128, str(folder), 24)
    common = ("--data.streaming=true", "--data.shuffle_buffer=30", "--train.dataloader_num_workers=2",
              "--train.max_steps=10", "--train.save_steps=3", "--eval.eval_steps=10", "--train.group_by_length=true",
              "--train.per_device_train_batch_size=16", "--train.report_to=tensorboard", "--model.dropout=0",
              "--eval.generation_max_length=4", "--train.deterministic=true")
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [9, None])):
        config = shard_config(tmp_path / name, fast_model, folder, *common)
        for stop in stops:
            config.train.resume = stop is None and name == "resumed"
            run = setup(config)
            if config.train.resume:  # 4 windows of 24 rows in batches of 16: 8 batches an epoch
                assert run.state.step == 9 and run.train_loader.position == StreamPosition(1, 0, 1)
            assert fit(run, StopAt(run, stop) if stop else None) == ("SIGTERM" if stop else "")
            run.accelerator.end_training()  # flushes TensorBoard
            reset_accelerate()
        runs[name] = load_file(str(tmp_path / name / "run" / "checkpoints" / "step_10" / "model.safetensors"))
    assert tensorboard_scalars(tmp_path / "resumed", "train/loss") == tensorboard_scalars(tmp_path / "straight",
                                                                                           "train/loss")
    assert all(torch.equal(runs["straight"][k], runs["resumed"][k]) for k in runs["straight"])
    report = json.loads((tmp_path / "resumed" / "run" / "data_report.json").read_text())
    assert report["streaming"]["sources"]["train"]["rows"] == 96 and report["streaming"]["stream_skipped"] == {}
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed" / "run")][-1] == 10


def test_an_unfinished_shard_folder_is_completed_without_redoing_finished_shards(shards, tmp_path, processor,
                                                                                 max_target_positions):
    """What a killed preparation leaves (no index, the last shards missing or without their sidecar) is completed
    by the same call: finished shards are kept as they are (the real kill -9 is the slow test below)."""
    folder, config = shards
    copy = damaged_copy(folder, tmp_path)
    (copy / "train" / INDEX_FILE).unlink()
    (copy / "train" / "shard-00006.json").unlink()  # shard 6 written, its sidecar not yet
    for name in ("shard-00007.json", "shard-00007.parquet"):
        (copy / "train" / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (copy / "train").glob("shard-*") if p.stem < "shard-00006"}
    written = write_shards(config, processor, max_target_positions, str(copy), shard_utterances=12)
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "train").glob("shard-*") if p.stem < "shard-00006"} == kept
    assert written["train"].shards == read_index(str(folder / "train")).shards  # the same shards, byte for byte


@pytest.mark.slow  # two preparation processes
def test_a_killed_shard_preparation_resumes_without_redoing_finished_shards(tmp_path, tiny_model_dir):
    args = ["--config", "quickstart", f"--model.name_or_path={tiny_model_dir}", *SMALL, "--data.num_proc=1",
            "--output_dir", tmp_path / "out", "--shards", tmp_path / "shards", "--shard_utterances=8"]
    kill_9_when(script_command("prepare_data", *args),
                lambda: len(list((tmp_path / "shards" / "train").glob("shard-*.json"))) >= 3)
    finished = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards" / "train").glob("shard-*")}
    assert not (tmp_path / "shards" / "train" / INDEX_FILE).exists()
    done = subprocess.run(script_command("prepare_data", *args), env=child_env(), cwd=PROJECT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train: 96 rows" in done.stdout
    after = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "shards" / "train").glob("shard-*")}
    assert all(after[name] == mtime for name, mtime in finished.items())  # finished shards were not written again
    assert read_index(str(tmp_path / "shards" / "train")).rows == 96


@pytest.mark.slow  # three training processes: a minute or two on 2 busy cores
def test_kill_9_in_the_second_epoch_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, fast_model):
    """Real processes streaming with two workers: one straight to step 12; one killed with SIGKILL once step 9 (in
    the second epoch) is saved, then resumed with --train.resume=true. Same weights at step 12."""
    folder = tmp_path / "shards"
    config = run_config(tmp_path / "prepare", fast_model, tmp_path / "cache", *SMALL)
    write_shards(config, load_processor(str(fast_model), "hindi", "transcribe"), 128, str(folder), 24)

    def command(out):
        return script_command(
            "train", "--config", "quickstart", "--output_dir", out, f"--model.name_or_path={fast_model}",
            "--data.source=shards", f"--data.path={folder}", "--data.streaming=true", "--data.shuffle_buffer=30",
            "--train.dataloader_num_workers=2", "--train.per_device_train_batch_size=16", "--train.warmup_steps=0",
            "--eval.eval_on_start=false", "--eval.guard_sets=[]", "--train.max_steps=12", "--train.save_steps=9",
            "--eval.eval_steps=12", "--eval.generation_max_length=4", "--train.deterministic=true")

    straight = subprocess.run(command(tmp_path / "straight"), env=child_env(threads=2), cwd=PROJECT,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    kill_9_when(command(out), lambda: bool(list_checkpoints(out)), env=child_env(threads=2))
    assert [step for step, _ in list_checkpoints(out)] == [9], "killed before step 9 was saved or after step 12"
    resumed = subprocess.run([*command(out), "--train.resume=true"], env=child_env(threads=2), cwd=PROJECT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_9" / "loop_state.json").read_text())
    assert state["streams"][0] | {"skipped": {}, "messages": {}} == {"epoch": 1, "window": 0, "batch": 1,
                                                                      "skipped": {}, "messages": {}}
    first = load_file(str(tmp_path / "straight" / "checkpoints" / "step_12" / "model.safetensors"))
    second = load_file(str(out / "checkpoints" / "step_12" / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
