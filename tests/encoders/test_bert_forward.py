"""The scripted BERT forward gives the module forward's pooled rows bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional
from transformers import BertConfig, BertModel

from mmrag.encoders.bert_forward import ScriptedBert, supports

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(**overrides: object) -> BertModel:
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


@torch.inference_mode()
def test_rows_equal_the_module_forward_bit_for_bit() -> None:
    model = tiny_bert()
    scripted = ScriptedBert(model)
    generator = torch.Generator().manual_seed(1)
    # repeated shapes too: the script executor optimises a function after its first runs
    for batch, length in [(1, 3), (1, 3), (4, 7), (4, 7), (4, 7), (2, 30), (1, 3)]:
        ids = torch.randint(1, 100, (batch, length), generator=generator)
        got = scripted(ids)
        assert got.shape == (batch, 32)
        assert torch.equal(got, module_pooled(model, ids))


@torch.inference_mode()
def test_it_shares_the_model_weights() -> None:
    model = tiny_bert()
    scripted = ScriptedBert(model)
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    before = scripted(ids)
    model.encoder.layer[1].output.dense.weight.mul_(2.0)  # a change the script must see
    after = scripted(ids)
    assert not torch.equal(before, after)
    assert torch.equal(after, module_pooled(model, ids))


def test_only_plain_bert_encoders_are_scripted() -> None:
    assert supports(tiny_bert())
    assert not supports(tiny_bert(hidden_act="relu"))
    assert not supports(tiny_bert(position_embedding_type="relative_key"))
    assert not supports(object())
    with pytest.raises(ValueError, match="plain BERT encoder"):
        ScriptedBert(tiny_bert(hidden_act="relu"))
