"""Data mixing (`data.mix`): the option as YAML and on the command line, and its checks; the epoch's draw (shares,
without replacement across epochs, a function of seed and epoch); mixed sources prepared with their own language
token and reported apart; and a mixed run (with no-speech rows) resuming bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from loop.config import ConfigError, MixSource, to_dict
from loop.config.loading import from_dict, load_config
from loop.data.loaders import train_dataloader
from loop.data.samplers import MixedSampler, epoch_quotas, mixed_epoch_order
from loop.data.splits import build_datasets
from loop.run.checkpoints import list_checkpoints
from loop.train import finish, fit, setup, train
from tests.helpers import CORPUS, reset_accelerate, tensorboard_scalars

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: a second thread only waits
ENGLISH = f"{{name: en, weight: 0.25, path: {CORPUS}, locale: hi, language: english, train_splits: [dev], max_samples: 24}}"


# --- the option ----------------------------------------------------------------------------------------------

def test_mix_from_yaml_and_from_the_command_line(tmp_path):
    preset = tmp_path / "mix.yaml"
    preset.write_text(yaml.safe_dump({"data": {"path": str(CORPUS), "mix": [
        {"name": "en", "weight": 0.2, "path": str(CORPUS), "language": "en", "train_splits": ["dev"]},
        {"name": "ta", "weight": "0.1", "path": str(CORPUS), "language": "tamil", "max_samples": "5"}]}}))
    from_yaml = load_config(str(preset), ["--model.name_or_path=assets/tiny-whisper-hi"])
    assert from_yaml.data.mix == [
        MixSource(name="en", weight=0.2, path=str(CORPUS), language="en", train_splits=["dev"]),
        MixSource(name="ta", weight=0.1, path=str(CORPUS), language="tamil", max_samples=5)]
    flow = (f"[{{name: en, weight: 0.2, path: {CORPUS}, language: en, train_splits: [dev]}}, "
            f"{{name: ta, weight: 0.1, path: {CORPUS}, language: tamil, max_samples: 5}}]")
    assert load_config("quickstart", [f"--data.mix={flow}"]).data.mix == from_yaml.data.mix
    assert from_dict(to_dict(from_yaml)).data.mix == from_yaml.data.mix  # a saved config.json reads back
    assert load_config("quickstart", ["--data.mix=[]"]).data.mix == []


def test_mix_problems_are_all_reported(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", [
            f"--data.mix=[{{name: en, weight: 0.6, path: {CORPUS}, langauge: en}}, {{name: x, weight: lots}}]"])
    problems = "\n".join(error.value.problems)
    assert "data.mix[0].langauge is not a field of MixSource (did you mean language?)" in problems
    assert "data.mix[1].weight: expected a number, got 'lots'" in problems
    mix = (f"[{{name: en, weight: 0.6, path: {CORPUS}}}, {{name: en, weight: 0.5, path: {tmp_path / 'none'}, "
           "language: klingon}, {weight: 0, source: hub}]")
    with pytest.raises(ConfigError) as error:
        load_config("quickstart", [f"--data.mix={mix}"])
    problems = "\n".join(error.value.problems)
    for expected in ("data.mix[1] (en).name 'en' is used by more than one data.mix entry",
                     f"data.mix[1] (en).path '{tmp_path / 'none'}' does not exist",
                     "data.mix[1] (en).language 'klingon' is not a Whisper language",
                     "data.mix[2].weight must be in (0, 1), got 0",
                     "data.mix[2].name must be a short name", "data.mix[2].dataset_name is required for source=hub",
                     "data.mix weights sum to 1.1"):
        assert expected in problems, problems
    with pytest.raises(ConfigError, match="expected a list of mappings"):
        load_config("quickstart", ["--data.mix=en"])


# --- the epoch's draw ----------------------------------------------------------------------------------------

SIZES, SHARES = [300, 40, 500], [0.6, 0.3, 0.1]  # a source smaller than its quota, one larger


def part_of(rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(SIZES), rows, side="right")


def test_each_epoch_draws_every_part_at_its_share():
    quotas = epoch_quotas(SIZES, SHARES)
    assert quotas == [300, 150, 50] and sum(quotas) == 500
    for epoch in range(3):
        order = mixed_epoch_order(SIZES, SHARES, seed=7, epoch=epoch)
        counts = np.bincount(part_of(order), minlength=3)
        assert counts.tolist() == quotas
        assert np.allclose(counts / counts.sum(), SHARES, atol=1 / counts.sum())
        assert sorted(order[part_of(order) == 0].tolist()) == list(range(300))  # the data source: each row once
        # shuffled together: every stretch of 100 rows holds each part near its share
        for start in range(0, 500, 100):
            window = np.bincount(part_of(order[start:start + 100]), minlength=3) / 100
            assert np.allclose(window, SHARES, atol=0.15), (epoch, start, window)


def test_mixed_parts_are_drawn_without_replacement_across_epochs():
    """The 500-row part gives 50 rows an epoch: ten epochs see each of its rows exactly once; the 40-row part
    gives 150 an epoch, each of its rows 3 or 4 times."""
    large, small = [], []
    for epoch in range(10):
        order = mixed_epoch_order(SIZES, SHARES, seed=7, epoch=epoch)
        large += order[part_of(order) == 2].tolist()
        if epoch == 0:
            small = np.bincount(order[part_of(order) == 1] - 300, minlength=40)
    assert sorted(large) == list(range(340, 840))
    assert set(small.tolist()) <= {3, 4} and small.sum() == 150


def test_the_order_depends_on_seed_and_epoch_only():
    first = mixed_epoch_order(SIZES, SHARES, seed=7, epoch=4)
    assert np.array_equal(first, mixed_epoch_order(SIZES, SHARES, seed=7, epoch=4))  # nothing carried between calls
    assert not np.array_equal(first, mixed_epoch_order(SIZES, SHARES, seed=7, epoch=5))
    assert not np.array_equal(first, mixed_epoch_order(SIZES, SHARES, seed=8, epoch=4))
    durations = np.random.default_rng(0).uniform(1, 4, sum(SIZES))
    grouped = MixedSampler(durations, SIZES, SHARES, seed=7, batch_size=10)
    grouped.set_epoch(4)
    rows = list(grouped)
    assert sorted(rows) == sorted(first.tolist()) and len(grouped) == 500  # the same rows, length-grouped
    spread = [np.ptp(durations[rows[i:i + 10]]) for i in range(0, 500, 10)]
    assert np.mean(spread) < 0.5 * np.ptp(durations)


# --- prepared sources ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(processor, max_target_positions, session_cache_dir):
    """The quickstart data (40 Hindi rows) with the dev split mixed in as English, prepared twice."""
    def build():
        config = load_config("quickstart", [f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1",
                                            "--data.max_train_samples=40", f"--data.mix=[{ENGLISH}]"])
        return build_datasets(config, processor, max_target_positions)
    return build(), build()


def test_each_source_is_reported_apart_and_labelled_in_its_language(mixed, processor):
    data, _ = mixed
    report = data.report_dict()
    assert report["train"]["kept"] == 40 and report["train.en"]["read"] == report["train.en"]["kept"] == 24
    assert report["train.en"]["skipped"] == {}
    assert report["mix"] == {"epoch_rows": 53, "sources": {
        "train": {"rows": 40, "share": 0.75, "rows_per_epoch": 40, "language": "hi"},
        "train.en": {"rows": 24, "share": 0.25, "rows_per_epoch": 13, "language": "en"}}}
    tokenizer = processor.tokenizer
    languages = [tokenizer.convert_ids_to_tokens(labels[1]) for labels in data.train["labels"]]
    assert languages == ["<|hi|>"] * 40 + ["<|en|>"] * 24
    english = data.train.select(range(40, 64))
    assert [tokenizer.convert_ids_to_tokens(labels[:4]) for labels in english["labels"]] == [
        ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]] * 24
    assert tokenizer.decode(english[0]["labels"], skip_special_tokens=True) == english[0]["text"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("").input_ids[1]) == "<|hi|>"  # the run's tokenizer is untouched


def test_a_bad_row_in_a_mixed_source_is_counted_in_its_own_report(corpus_copy, processor, max_target_positions,
                                                                  session_cache_dir):
    folder = corpus_copy(train=6, dev=0, test=2)
    first_clip = (folder / "train.tsv").read_text(encoding="utf-8").splitlines()[1].split("\t")[1]
    (folder / "clips" / first_clip).write_bytes(b"not audio")
    config = load_config("quickstart", [f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1",
                                        "--data.max_train_samples=20",
                                        f"--data.mix=[{{name: more, weight: 0.1, path: {folder}, train_splits: [train]}}]"])
    report = build_datasets(config, processor, max_target_positions).report_dict()
    assert report["train"]["skipped"] == {}
    assert report["train.more"]["kept"] == 5 and sum(report["train.more"]["skipped"].values()) == 1


def test_two_builds_give_the_same_batches(mixed):
    first, second = mixed
    orders = []
    for data in (first, second):
        loader = train_dataloader(data.train, 8, seed=3, decoder_start_token_id=0, parts=data.train_parts)
        epochs = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            epochs.append([batch["index"].tolist() for batch in loader])
        orders.append(epochs)
        assert len(loader) == 7 and sum(len(b) for b in epochs[0]) == 53
    assert orders[0] == orders[1] and orders[0][0] != orders[0][1]


# --- training ------------------------------------------------------------------------------------------------

def test_a_mixed_run_with_no_speech_rows_resumes_bit_exactly(tmp_path, fast_model, session_cache_dir):
    """14 steps straight == 11 steps, stop, resume, 3 steps, with an English source and no-speech rows (10 batches
    an epoch: the stop falls in the second epoch): the same per-step losses and final weights, to the bit."""
    from tests.helpers import StopAt
    from tests.test_train import small_run

    common = ("--train.max_steps=14", "--train.save_steps=3", "--eval.eval_steps=7", "--train.save_total_limit=2",
              f"--data.mix=[{ENGLISH}]", "--data.no_speech_fraction=0.2")
    straight = train(small_run(tmp_path, fast_model, session_cache_dir, *common, name="straight"))
    assert straight["data"]["train"]["no_speech"] == 12 and straight["data"]["mix"]["epoch_rows"] == 80
    reset_accelerate()
    config = small_run(tmp_path, fast_model, session_cache_dir, *common, name="resumed")
    run = setup(config)
    assert len(run.train_loader) == 10  # (48 + 12) rows / 0.75 = 80 a epoch, batch 8
    assert fit(run, StopAt(run, 11)) == "SIGTERM"
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 11 and run.state.epoch == 1 and run.state.batches_in_epoch == 1
    assert fit(run) == ""
    resumed = finish(run)
    losses_straight = tensorboard_scalars(tmp_path / "straight", "train/loss")
    assert sorted(losses_straight) == list(range(1, 15))
    assert tensorboard_scalars(tmp_path / "resumed", "train/loss") == losses_straight
    final = [load_file(str(tmp_path / name / "checkpoints" / "step_14" / "model.safetensors"))
             for name in ("straight", "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert resumed["test_wer"] == straight["test_wer"]
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")][-2:] == [12, 14]
