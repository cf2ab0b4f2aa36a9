"""The chat's image decision: conversations from captions, and `mmrag train chat` on a tiny
random LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmrag.chat.prompts import (
    QUESTIONS,
    REQUESTS,
    family_split,
    load_items,
    request_examples,
)
from mmrag.chat.query_head import EncoderMismatchError, QueryHead
from mmrag.chat.request import RequestDecision
from mmrag.chat.train import BLENDS
from mmrag.models.fromage.language_model import tiny_language_model
from mmrag.models.fromage.model import FrozenLM, FrozenLMConfig
from tiny_data import write_families

pytestmark = pytest.mark.pretrained  # EfficientNet-Lite0 features of the attached images


def test_families_and_phrasings_are_split() -> None:
    assert family_split("pizza") == family_split("pizza")
    counts = {s: 0 for s in ("train", "validation", "test")}
    for i in range(2000):
        counts[family_split(f"family {i}")] += 1
    assert 0.15 < counts["test"] / 2000 < 0.25 and 0.06 < counts["validation"] / 2000 < 0.14
    for table in (REQUESTS, QUESTIONS):
        assert not set(table["train"]) & set(table["validation"])


def test_examples_are_labelled_conversations(tmp_path: Path) -> None:
    items = load_items([write_families(tmp_path / "data")])
    assert len(items) == 80 and items[0].image is not None
    examples = request_examples(items, "train", 60, seed=0)
    again = request_examples(items, "train", 60, seed=0)
    assert [(e.kind, e.label) for e in again] == [(e.kind, e.label) for e in examples]
    kinds = {e.kind: e.label for e in examples}
    assert kinds.get("request") == 1 and kinds.get("plain") == 0 and kinds.get("follow") == 1
    for example in examples:
        assert example.messages[-1].role == "user"
        if example.kind in ("request", "question", "follow"):
            text = example.messages[-1].parts[-1]
            assert isinstance(text, str)
            assert "thing" in text


def test_mmrag_train_chat_on_a_tiny_budget(tmp_path: Path) -> None:
    from mmrag.cli.main import main

    torch.manual_seed(0)
    fromage = tmp_path / "fromage"
    FrozenLM(FrozenLMConfig(lm="tiny", img_tokens=2), tiny_language_model()).save_pretrained(
        fromage
    )
    data = write_families(tmp_path / "data")
    out = tmp_path / "chat"
    argv = ["train", "chat", "--data", str(data), "--out", str(out), "--fromage", str(fromage)]
    assert main([*argv, "--examples", "48", "--encoder", "hashing", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == {"train": 48, "validation": 16}
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0 and metrics["temperature"] > 0
    assert "mmrag train chat --data" in (out / "RECIPE.md").read_text()
    query = metrics["query_head"]
    assert query["blend"] in BLENDS and set(query["validation_recall_by_blend"]) == {
        str(b) for b in BLENDS
    }
    head = QueryHead.from_pretrained(out)
    assert head.config.encoder == "hashing" and head.config.dim == 64
    with pytest.raises(EncoderMismatchError, match="retrain it"):
        head.check("lite", "lite-abc")
    model = FrozenLM.from_pretrained(fromage)
    head = RequestDecision.from_pretrained(out, model.language_model.identity)
    assert head.probability(torch.zeros(1, model.language_model.hidden_size)).shape == (1,)
