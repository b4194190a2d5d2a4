"""The analytic memory table (benchmarks/memory.py): its structure and the orderings any correct estimate keeps
(no figure is hard-coded: they are estimates, to be replaced by GPU measurements)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.memory import (
    METHODS,
    WHISPER_SHAPES,
    adapter_parameters,
    estimate_table,
    memory_estimate,
    parameter_counts,
    whisper_config,
)
from tests.helpers import PROJECT

PARTS = ("weights", "gradients", "optimizer", "activations")


@pytest.fixture(scope="module")
def table():
    return {(row["model"], row["method"]): row for row in estimate_table()}


def test_every_model_and_method_has_parts_that_add_up(table):
    assert set(table) == {(model, method) for model in WHISPER_SHAPES for method in METHODS}
    for key, row in table.items():
        for variant in ("plain", "checkpointed"):
            parts = row[variant]
            assert all(parts[name] > 0 for name in PARTS), (key, variant)
            assert parts["total"] == pytest.approx(sum(parts[name] for name in PARTS)), (key, variant)


def test_orderings(table):
    """LoRA < full, QLoRA < LoRA, 8-bit AdamW < AdamW, checkpointing < none, and every method grows with the
    model (turbo, with 4 decoder layers, between medium and large-v3)."""
    order = ["tiny", "base", "small", "medium", "large-v3"]
    for model in WHISPER_SHAPES:
        for variant in ("plain", "checkpointed"):
            total = {method: table[(model, method)][variant]["total"] for method in METHODS}
            assert total["qlora"] < total["lora"] < total["full"], (model, variant, total)
            assert total["full_adamw_8bit"] < total["full"]
        for method in METHODS:
            row = table[(model, method)]
            assert row["checkpointed"]["total"] < row["plain"]["total"]
            assert row["checkpointed"]["weights"] == row["plain"]["weights"]
    for method in METHODS:
        for variant in ("plain", "checkpointed"):
            totals = [table[(model, method)][variant]["total"] for model in order]
            assert totals == sorted(totals) and len(set(totals)) == len(totals), (method, variant, totals)
            turbo = table[("large-v3-turbo", method)][variant]["total"]
            assert table[("large-v3", method)][variant]["total"] > turbo


def test_counts_follow_the_shapes():
    """Parameters match the published sizes (39 M ... 1550 M, rounded in the paper; counted on the meta device);
    the adapter count is the loop's own (rank 32 on q, k, v, out: 7.1 M for small); memory grows with batch and
    label length."""
    published_millions = {"tiny": 39, "base": 74, "small": 244, "medium": 769, "large-v3": 1550,
                          "large-v3-turbo": 809}
    for name, millions in published_millions.items():
        assert parameter_counts(whisper_config(name)).total / 1e6 == pytest.approx(millions, rel=0.04), name
    small = whisper_config("small")
    assert adapter_parameters(small) == 12 * 4 * 32 * 2 * 768 + 12 * 8 * 32 * 2 * 768
    assert adapter_parameters(small, modules=("q_proj", "fc1")) > adapter_parameters(small, modules=("q_proj",))
    for method in METHODS:
        base = memory_estimate(small, method, batch_size=8, label_tokens=128)
        assert memory_estimate(small, method, batch_size=16, label_tokens=128)["activations"] > base["activations"]
        assert memory_estimate(small, method, batch_size=8, label_tokens=448)["activations"] > base["activations"]
    with pytest.raises(ValueError, match="not one of"):
        memory_estimate(small, "lora_8bit")


def test_the_command_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--label_tokens", "128"], cwd=PROJECT,
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "**" in line]
    assert len(rows) == len(WHISPER_SHAPES) * len(METHODS)
    assert "estimates only" in done.stdout and "128 label tokens" in done.stdout
