"""`mmrag eval chat` scores what `mmrag chat` answers: same function, same options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmrag.chat.evaluate import absent, evaluate, head_words, names
from mmrag.chat.prompts import family_split
from mmrag.chat.request import RequestConfig, RequestDecision
from mmrag.checkpoints import ENV_VAR
from mmrag.models.fromage.language_model import tiny_language_model
from mmrag.models.fromage.model import FrozenLM, FrozenLMConfig
from tiny_data import write_families

pytestmark = pytest.mark.pretrained  # EfficientNet-Lite0 features of the attached images


def test_naming_reads_the_caption_head() -> None:
    assert head_words("woman surfing: dark skin tone") == {"surfing"}
    assert names("This is a surfing contest.", "woman surfing: dark skin tone")
    assert not names("This is a person.", "woman surfing: dark skin tone")
    assert names("A pizza.", "pizza")


def test_absent_families_are_half_the_test_families() -> None:
    families = [f"family {i}" for i in range(1000)]
    test = [f for f in families if family_split(f) == "test"]
    gone = [f for f in families if absent(f)]
    assert set(gone) <= set(test) and 0.3 < len(gone) / len(test) < 0.7


@pytest.fixture
def tiny_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.manual_seed(0)
    root = tmp_path / "ckpt"
    model = FrozenLM(FrozenLMConfig(lm="tiny", img_tokens=2), tiny_language_model())
    model.save_pretrained(root / "fromage")
    config = RequestConfig(
        hidden=model.language_model.hidden_size, lm_identity=model.language_model.identity
    )
    head = RequestDecision(config)
    with torch.no_grad():  # never asks for an image: every reply is words
        head.linear.weight.zero_()
        head.linear.bias.fill_(-20.0)
    head.save_pretrained(root / "chat")
    monkeypatch.setenv(ENV_VAR, str(root))
    return root


def test_eval_chat_scores_the_cli_replies(
    tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmrag.cli.main import main

    data = write_families(tmp_path / "data", families=60)
    memory = tmp_path / "memory"
    result = evaluate([data], memory, per_kind=2, seed=0, encoder="hashing", gill=False)
    shipped = result["systems"]["chat (shipped)"]
    assert shipped["text_rate"] == 1.0 and shipped["accuracy"]["plain"] == 1.0
    assert set(shipped["n"]) == {"what", "show", "plain", "draw", "follow"}
    # The same turns through the command line give the same replies.
    for transcript in shipped["transcripts"]:
        if transcript["kind"] not in ("show", "plain"):
            continue
        turn = transcript["turns"][0]
        assert main(["chat", str(memory), "--message", turn["user"], "--json", "--no-gill"]) == 0
        payload = json.loads(capsys.readouterr().out)
        texts = [p["text"] for p in payload["parts"] if p["type"] == "text"]
        assert texts == [turn["text"]]
        assert [p for p in payload["parts"] if p["type"] == "image"] == [] == turn["images"]
    no_retrieval = result["systems"]["chat, no retrieval"]
    assert all(t["turns"][0]["text"] != "" for t in no_retrieval["transcripts"])
