"""FROMAGe's frozen-LM model: token rows, padding, the KV cache, generation, losses, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmrag.models.fromage.language_model import tiny_language_model
from mmrag.models.fromage.model import (
    IMAGE_SLOT,
    SHARED_MIN,
    FrozenLM,
    FrozenLMConfig,
    GenerateOptions,
    TokenRow,
    shared_prefix,
)
from mmrag.training.losses import contrastive, info_nce, masked_l2

FEATURES = 16


@pytest.fixture
def model() -> FrozenLM:
    torch.manual_seed(0)
    config = FrozenLMConfig(lm="tiny", image_feature_dim=FEATURES, prefix_tokens=2, img_tokens=3)
    return FrozenLM(config, tiny_language_model())


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(4, FEATURES, generator=torch.Generator().manual_seed(1))


def rows(model: FrozenLM) -> list[TokenRow]:
    a, b = model.encode_text("a red heart"), model.encode_text("woman dancing: medium skin tone")
    return [
        TokenRow([IMAGE_SLOT, *a], [0]),
        TokenRow([*b, model.ret_id]),
        TokenRow([IMAGE_SLOT, *a, IMAGE_SLOT, *b], [2, 3]),
    ]


def test_state_dict_holds_the_adapters_only(model: FrozenLM) -> None:
    names = set(model.state_dict())
    assert names and all(n.startswith("adapters.") for n in names)
    assert not any(p.requires_grad for p in model.language_model.model.parameters())


def test_new_token_embeddings_and_logits(model: FrozenLM) -> None:
    ids = torch.tensor([[5, model.ret_id, model.img_ids[1]]])
    emb = model.embed_ids(ids)  # (1, 3, H)
    assert torch.equal(emb[0, 0], model.table[5])
    assert torch.equal(emb[0, 1], model.adapters.ret_token[0])
    assert torch.equal(emb[0, 2], model.adapters.img_tokens[1])
    logits = model.logits(emb[0])
    assert logits.shape == (3, model.vocab + 1 + model.config.img_tokens)
    assert torch.allclose(logits[1, model.ret_id], emb[0, 1] @ emb[0, 1])


def test_assemble_places_prefix_vectors_and_pads_left(
    model: FrozenLM, features: torch.Tensor
) -> None:
    batch = model.assemble(rows(model), features)
    k = model.config.prefix_tokens
    prefix = model.adapters.prefix(features)  # (4, k, H)
    first = batch.mask[0].long().argmax()  # row 0 is left-padded
    assert not batch.mask[0, :first].any()
    assert torch.allclose(batch.embeds[0, first : first + k], prefix[0], atol=1e-6)
    slots = (batch.ids[2] == IMAGE_SLOT).nonzero().flatten()
    assert torch.allclose(batch.embeds[2, slots[:k]], prefix[2], atol=1e-6)
    assert torch.allclose(batch.embeds[2, slots[k:]], prefix[3], atol=1e-6)
    with pytest.raises(ValueError, match="feature index"):
        TokenRow([IMAGE_SLOT, 3])


def test_padded_rows_compute_what_they_compute_alone(
    model: FrozenLM, features: torch.Tensor
) -> None:
    batch = model.assemble(rows(model), features)
    hidden, _ = model.run(batch.embeds, batch.mask)
    for i, row in enumerate(rows(model)):
        alone = model.assemble([row], features)
        h, _ = model.run(alone.embeds, alone.mask)
        assert torch.allclose(hidden[i, -h.shape[1] :], h[0], atol=1e-5)


def test_cached_continuation_equals_the_full_forward(model: FrozenLM) -> None:
    a, b = model.encode_text("a cat face"), model.encode_text("flag: Japan")
    full = model.assemble([TokenRow(a + b)])
    h_full, _ = model.run(full.embeds, full.mask)
    first = model.assemble([TokenRow(a)])
    _, state = model.run(first.embeds, first.mask)
    second = model.assemble([TokenRow(b)])
    h_second, _ = model.run(second.embeds, second.mask, state)
    assert torch.allclose(h_full[0, len(a) :], h_second[0], atol=1e-5)


def test_greedy_generation_matches_step_by_step_argmax(
    model: FrozenLM, features: torch.Tensor
) -> None:
    out = model.generate(rows(model), features, GenerateOptions(max_new_tokens=5, stop_ids=(-7,)))
    for row, gen in zip(rows(model), out, strict=True):
        assert len(gen.tokens) == 5
        ids = list(row.ids)
        for token in gen.tokens:
            batch = model.assemble([TokenRow(ids, row.images)], features)
            h, _ = model.run(batch.embeds, batch.mask)
            logits = model.logits(h[0, -1])
            logits[list(model.img_ids[1:])] = -torch.inf
            assert int(logits.argmax()) == token
            ids.append(token)


def test_img0_forces_the_other_img_tokens_and_keeps_their_hidden_states(
    model: FrozenLM, features: torch.Tensor
) -> None:
    opts = GenerateOptions(max_new_tokens=5, img_bias=1e4, allow_ret=False, stop_ids=(-7,))
    gen = model.generate(rows(model)[:1], features, opts)[0]
    assert gen.tokens[:3] == list(model.img_ids)
    assert [index for index, _ in gen.hidden[:3]] == [0, 1, 2]
    # the kept state at [IMG0] is the hidden state of the row followed by [IMG0]
    row = rows(model)[0]
    batch = model.assemble([TokenRow([*row.ids, model.img_ids[0]], row.images)], features)
    h, _ = model.run(batch.embeds, batch.mask)
    assert torch.allclose(gen.hidden[0][1], h[0, -1], atol=1e-5)


def test_stop_token_ends_a_row_and_batch_rows_are_independent(
    model: FrozenLM, features: torch.Tensor
) -> None:
    alone = model.generate(rows(model)[1:2], features, GenerateOptions(max_new_tokens=4))[0]
    both = model.generate(rows(model)[:2], features, GenerateOptions(max_new_tokens=4))[1]
    assert alone.tokens == both.tokens
    stop = alone.tokens[0]
    stopped = model.generate(rows(model)[1:2], features, GenerateOptions(4, stop_ids=(stop,)))
    assert stopped[0].tokens == [stop]


def test_caption_loss_trains_only_the_adapters_and_a_tiny_batch_overfits(
    model: FrozenLM, features: torch.Tensor
) -> None:
    eos = model.tokenizer.eos_token_id
    caption = model.encode_text("a red heart")
    row = TokenRow([IMAGE_SLOT, *caption, eos], [0], [False] + [True] * (len(caption) + 1))
    params = [model.adapters.visual_prefix.weight, model.adapters.visual_prefix.bias]
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(60):
        batch = model.assemble([row], features)
        hidden, _ = model.run(batch.embeds, batch.mask)
        total, count = model.target_loss(batch, hidden)
        assert count == len(caption) + 1
        opt.zero_grad()
        (total / count).backward()
        opt.step()
        losses.append(float(total.detach()) / count)
    assert losses[-1] < 0.65 * losses[0]
    assert all(p.grad is None for p in model.language_model.model.parameters())


def test_rescale_new_tokens_restores_the_mean_frozen_norm(model: FrozenLM) -> None:
    with torch.no_grad():
        model.adapters.ret_token.mul_(7.0)
    model.rescale_new_tokens()
    norms = model.new_rows.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, model.target_norm), atol=1e-5)


def test_save_and_load_round_trip_strictly(model: FrozenLM, tmp_path: Path) -> None:
    with torch.no_grad():
        model.adapters.text_proj.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = FrozenLM.from_pretrained(tmp_path, lm=model.language_model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert loaded.fingerprint() == model.fingerprint()
    other = tiny_language_model(seed=1)
    with pytest.raises(ValueError, match="trained on the LM"):
        FrozenLM.from_pretrained(tmp_path, lm=other)


def test_info_nce_is_low_for_aligned_pairs_and_respects_duplicates() -> None:
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)))
    scale = torch.tensor(4.0)  # 1/T = e^4
    aligned = info_nce(x, x, scale)
    shuffled = info_nce(x, x.roll(1, 0), scale)
    assert aligned < 0.1 < shuffled
    dup = x.clone()
    dup[1] = dup[0]  # two copies of one image: neither should count as the other's negative
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert info_nce(dup, dup, scale, same) < 0.05 < 0.2 < info_nce(dup, dup, scale)
    gallery = torch.cat([x, -x])  # a gallery with targets elsewhere than the diagonal
    t = torch.arange(6) + 6
    assert contrastive(-x, gallery, scale, t) < 0.1


def test_masked_l2_ignores_masked_slots() -> None:
    a, b = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    b[:, 2] = 100.0
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert float(masked_l2(a, b, mask)) == pytest.approx(1.0)
    assert float(masked_l2(a, b)) > 1000


def test_special_states_share_a_common_beginning_exactly(
    model: FrozenLM, features: torch.Tensor
) -> None:
    from mmrag.models.fromage.conversation import Message, chat_row

    system = Message("system", ["You are a helpful assistant."])
    rows = [
        chat_row(model, [system, Message("user", ["Show me a red heart."])]),
        chat_row(model, [system, Message("user", ["What is this?", Image.new("RGB", (4, 4))])]),
        chat_row(model, [system, Message("user", ["a cat face"])]),
    ]
    rows[1].images = [2]
    assert shared_prefix(rows) >= SHARED_MIN
    together = model.special_states(rows, [model.ret_id, model.img_ids[0]], features)
    for i, row in enumerate(rows):
        batch = model.assemble(
            [TokenRow([*row.ids, model.ret_id, model.img_ids[0]], row.images)], features
        )
        h, _ = model.run(batch.embeds, batch.mask)
        assert torch.allclose(together[i], h[0, -2:], atol=1e-5)


@pytest.mark.pretrained
def test_smollm2_from_the_package_with_the_shipped_fromage_adapters() -> None:
    """The real frozen LM (first run: ~20-40 s to dequantise the GGUF into the cache)."""
    from mmrag.checkpoints import checkpoint_dir
    from mmrag.models.fromage.conversation import Message, chat_row
    from mmrag.models.fromage.language_model import load_smollm2

    lm = load_smollm2()
    assert (lm.hidden_size, lm.vocab_size) == (576, 49152)
    model = FrozenLM.from_pretrained(checkpoint_dir("fromage"), lm=lm)
    question = chat_row(model, [Message("user", ["What is the capital of France?"])])
    opts = GenerateOptions(max_new_tokens=8, allow_ret=False, allow_img=False)
    answer = model.decode_text(model.generate([question], None, opts)[0].tokens)
    assert "Paris" in answer  # the adapters leave the frozen LM as it was
    request = chat_row(model, [Message("user", ["Show me a red heart."])])
    last, _ = model.prefill([request])
    logits = model.logits(last)[0, : model.vocab + 1]  # the frozen vocabulary and [RET]
    assert int(logits.argmax()) == model.ret_id  # trained to answer a request with [RET]
