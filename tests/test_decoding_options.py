"""Decoding options against hallucination: saved in the model folder, read back, and each measured on a model
trained to loop (the fast tiny model taught to answer every clip with one word repeated)."""

import json

import pytest
import torch

from loop.config import EvalConfig
from loop.config.loading import load_config
from loop.data.sources import write_manifest
from loop.eval.hallucination import compression_ratio
from loop.eval.saved_model import DecodeOverrides, run_evaluation
from loop.model.decoding_options import MIN_NEW_TOKENS, DurationCap, describe
from loop.model.loading import load_for_inference, set_generation_settings
from loop.train import train
from tests.helpers import corpus_rows, run_config

LOOP_WORD = "और"
LOOP_TEXT = " ".join([LOOP_WORD] * 12)


def test_duration_cap_forces_end_of_text_per_row():
    cap = DurationCap(torch.tensor([1.0, 4.0]), tokens_per_second=3.0, end_token_id=7)
    assert cap.caps.tolist() == [MIN_NEW_TOKENS, 12]
    prompt = torch.zeros(2, 3, dtype=torch.long)
    scores = torch.zeros(2, 10)
    assert torch.equal(cap(prompt, scores.clone()), scores)  # the first call only measures the prompt
    after_eight = torch.zeros(2, 3 + MIN_NEW_TOKENS, dtype=torch.long)
    capped = cap(after_eight, torch.zeros(2, 10))
    assert capped[0].argmax() == 7 and torch.isinf(capped[0]).sum() == 9  # row 0 must end now
    assert torch.equal(capped[1], torch.zeros(10))  # row 1 may go on to 12 new tokens
    beams = cap(torch.zeros(4, 3 + 12, dtype=torch.long), torch.zeros(4, 10))  # 2 rows x 2 beams
    assert (beams.argmax(dim=1) == 7).all()


def test_the_fallback_samples_again_only_the_rows_that_loop_until_they_pass():
    from types import SimpleNamespace

    from loop.model.decoding_options import FALLBACK_TEMPERATURES, temperature_fallback

    words = {1: "और", 2: "मैं", 3: "घर", 4: "जा", 5: "रहा", 0: ""}
    decode = lambda ids: [" ".join(words[i] for i in row.tolist() if i) for row in ids]  # noqa: E731
    greedy = torch.tensor([[2, 3, 4, 5, 0], [1] * 5])  # row 1 loops... but five words compress too little
    looping = torch.cat([greedy, torch.ones(2, 40, dtype=torch.long)], dim=1)
    looping[0, 5:] = 0  # row 0 clean, row 1 "और" x 45
    calls = []

    def sample(rows, temperature):
        calls.append((rows.tolist(), temperature))
        # the second temperature gives a clean answer, the first loops again
        return torch.tensor([[2, 3, 4]]) if temperature == FALLBACK_TEMPERATURES[1] else torch.ones(1, 30).long()

    settings = SimpleNamespace(temperature_fallback=True, fallback_compression_ratio=2.4, pad_token_id=0)
    fixed = temperature_fallback(looping, decode, sample, settings)
    assert calls == [([1], FALLBACK_TEMPERATURES[0]), ([1], FALLBACK_TEMPERATURES[1])]
    assert decode(fixed) == ["मैं घर जा रहा", "मैं घर जा"]
    settings.temperature_fallback = False
    assert temperature_fallback(looping, decode, sample, settings) is looping


def test_options_are_saved_with_the_model_and_read_back(tmp_path, tiny_model_dir):
    model, processor = load_for_inference(str(tiny_model_dir))
    options = EvalConfig(no_repeat_ngram_size=3, max_new_tokens_per_second=20.0, temperature_fallback=True)
    set_generation_settings(model, "hindi", "transcribe", options)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["no_repeat_ngram_size"] == 3 and saved["max_new_tokens_per_second"] == 20.0
    assert saved["temperature_fallback"] is True and saved["fallback_compression_ratio"] == 2.4
    reloaded, _ = load_for_inference(str(tmp_path))
    assert describe(reloaded.generation_config) == {"no_repeat_ngram_size": 3, "max_new_tokens_per_second": 20.0,
                                                    "temperature_fallback": True, "compression_ratio_threshold": 2.4}
    set_generation_settings(reloaded, "hindi", "transcribe", EvalConfig())  # all off again
    assert describe(reloaded.generation_config) == {"no_repeat_ngram_size": None, "max_new_tokens_per_second": None,
                                                    "temperature_fallback": False, "compression_ratio_threshold": None}


@pytest.fixture(scope="module")
def looping_model(tmp_path_factory, fast_model):
    """The fast tiny model trained until it answers every clip with `LOOP_TEXT`, and the manifest of its clips."""
    folder = tmp_path_factory.mktemp("looping")
    rows = [{**row, "text": LOOP_TEXT} for row in corpus_rows("train")[:8]]
    write_manifest(folder / "m" / "train.csv", rows)
    config = run_config(
        folder / "out", fast_model, folder / "cache", "--data.source=manifest", f"--data.path={folder / 'm'}",
        "--data.train_splits=train", "--data.eval_split=train", "--eval.select_on=test", "--train.max_steps=60",
        "--train.learning_rate=3e-3", "--train.per_device_train_batch_size=8", "--eval.eval_steps=60",
        "--train.save_steps=60", "--eval.generation_max_length=40", "--model.dropout=0",
        "--model.apply_spec_augment=false",
    )
    train(config)
    return folder / "out" / "best", folder


def evaluate_with(looping_model, name, **options):
    best, folder = looping_model
    config = load_config("quickstart", [f"--model.name_or_path={best}", "--data.source=manifest",
                                        f"--data.path={folder / 'm'}", "--data.eval_split=train",
                                        f"--data.cache_dir={folder / 'cache'}"], str(folder / name))
    torch.manual_seed(0)
    metrics = run_evaluation(config, str(best), decode=DecodeOverrides(options=options))
    rows = [json.loads(line) for line in (folder / name / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows


def test_each_option_measured_on_a_model_that_loops(looping_model):
    greedy, greedy_rows = evaluate_with(looping_model, "greedy")
    assert greedy["loop_share"] >= 75.0, greedy_rows  # the model loops

    blocked, blocked_rows = evaluate_with(looping_model, "no-repeat", no_repeat_ngram_size=2)
    assert blocked["loop_share"] == 0.0 and blocked["decoding"]["no_repeat_ngram_size"] == 2
    tokenizer = load_for_inference(str(looping_model[0]))[1].tokenizer
    for row in blocked_rows:  # no two tokens in a row twice (the text re-tokenized as generated)
        ids = tokenizer(row["hypothesis"], add_special_tokens=False).input_ids
        bigrams = list(zip(ids, ids[1:]))
        assert len(set(bigrams)) == len(bigrams), row

    capped, capped_rows = evaluate_with(looping_model, "capped", max_new_tokens_per_second=3.0)
    for row in capped_rows:  # each hypothesis within its own clip's cap
        limit = max(MIN_NEW_TOKENS, int(torch.ceil(torch.tensor(row["duration"] * 3.0))))
        assert len(tokenizer(row["hypothesis"], add_special_tokens=False).input_ids) <= limit + 1
    assert capped["insertion_rate"] <= greedy["insertion_rate"]

    fallback, fallback_rows = evaluate_with(looping_model, "fallback", temperature_fallback=True)
    assert fallback["decoding"]["temperature_fallback"] is True and fallback["num_failed"] == 0
    assert len(fallback_rows) == len(greedy_rows)
    # The loops compress beyond the threshold, so those rows are decoded again by sampling: what comes back
    # compresses less (a row that never passes keeps its last sample).
    looped = [i for i, r in enumerate(greedy_rows) if compression_ratio(r["hypothesis"]) > 2.4]
    assert looped, "the looping model's hypotheses should compress beyond 2.4"
    assert all(fallback_rows[i]["hypothesis"] != greedy_rows[i]["hypothesis"] for i in looped)
    assert fallback["compressible_share"] < greedy["compressible_share"]
    unlooped = [i for i in range(len(greedy_rows)) if i not in looped]
    assert all(fallback_rows[i]["hypothesis"] == greedy_rows[i]["hypothesis"] for i in unlooped)
    print({name: {k: m[k] for k in ("wer", "loop_share", "long_share", "insertion_rate", "compressible_share")}
           for name, m in (("greedy", greedy), ("no_repeat_ngram_size=2", blocked),
                           ("max_new_tokens_per_second=3", capped), ("temperature_fallback", fallback))})
