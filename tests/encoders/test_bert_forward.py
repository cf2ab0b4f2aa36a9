"""The scripted BERT forward over packed texts gives the module forward's pooled rows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional
from transformers import BertConfig, BertModel

from mmrag.encoders.bert_forward import ScriptedBert, supports

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(**overrides: Any) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **overrides,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def module_pooled(model: BertModel, ids: torch.Tensor) -> torch.Tensor:
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return functional.normalize(hidden.mean(dim=1), dim=-1)


def token_ids(lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def test_packed_rows_equal_each_text_alone() -> None:
    model = tiny_bert()
    scripted = ScriptedBert(model)
    # mixed token counts in any order, repeated calls (the script executor optimises a
    # function after its first runs), a long text, one text alone
    batches = [[3, 7, 3, 5, 7, 7, 1], [3, 7, 3, 5, 7, 7, 1], [30, 2], [4], [4] * 6]
    for seed, lengths in enumerate(batches):
        ids = token_ids(lengths, seed)
        got = scripted(ids)
        assert got.shape == (len(ids), 32)
        alone = torch.cat([module_pooled(model, torch.tensor([text])) for text in ids])
        # to float rounding of matrix products with more rows (a few rows differ by ~1e-7)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-6)
        if lengths == [4] * 6:  # one token count: the module forward's own batch, exactly
            assert torch.equal(got, module_pooled(model, torch.tensor(ids)))
    assert scripted([]).shape == (0, 32)


@torch.inference_mode()
def test_it_shares_the_model_weights() -> None:
    model = tiny_bert()
    scripted = ScriptedBert(model)
    ids = token_ids([5, 5], 2)
    before = scripted(ids)
    model.encoder.layer[1].output.dense.weight.mul_(2.0)  # a change the script must see
    after = scripted(ids)
    assert not torch.equal(before, after)
    assert torch.equal(after, module_pooled(model, torch.tensor(ids)))


def test_only_plain_bert_encoders_are_scripted() -> None:
    assert supports(tiny_bert())
    assert not supports(tiny_bert(hidden_act="relu"))
    assert not supports(tiny_bert(position_embedding_type="relative_key"))
    assert not supports(object())
    with pytest.raises(ValueError, match="plain BERT encoder"):
        ScriptedBert(tiny_bert(hidden_act="relu"))
