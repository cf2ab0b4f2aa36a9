"""The decoder-only generator: shapes, causality, KV cache = full forward, padding, overfitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional

from mmrag.config import ConfigError
from mmrag.models.ra_cm3 import generator as generator_module
from mmrag.models.ra_cm3.generator import (
    Generator,
    GeneratorConfig,
    _blocks_step,
    apply_rope,
    rope_tables,
)

TINY = GeneratorConfig.preset("tiny")
ATOL = 1e-5


# Ids 50..99 are image codes of a 2 x 2 grid: random ids make runs of every length, so the
# cache, padding and greedy tests below also check the grid positions' bookkeeping.
GRID = TINY.replace(image_grid=2, image_first=50, image_count=50)


@pytest.fixture(params=[TINY, GRID], ids=["plain", "image-grid"])
def model(request: pytest.FixtureRequest) -> Generator:
    torch.manual_seed(0)
    return Generator(request.param).eval()


def test_image_grid_positions_touch_image_codes_only() -> None:
    torch.manual_seed(0)
    model = Generator(GRID).eval()
    text = torch.tensor([[1, 2, 3, 4, 5]])
    codes = torch.tensor([[1, 60, 61, 62, 63, 64]])  # 5 codes: cells 0 1 2 3 0
    with torch.no_grad():
        before = model(text), model(codes)
        assert model.image_rows is not None and model.image_cols is not None
        model.image_rows.weight.add_(1.0)
        after = model(text), model(codes)
        torch.testing.assert_close(before[0], after[0])  # no codes: nothing changed
        torch.testing.assert_close(before[1][:, 0], after[1][:, 0])  # before the first code
        assert not torch.allclose(before[1][:, 1:], after[1][:, 1:])
        # cells repeat every g^2 codes: codes 1 and 5 (cell 0) and the same id, same embedding
        same = torch.tensor([[1, 60, 61, 62, 63, 60]])
        x = model.embed(same)
        grid, run = model._add_image_positions(
            x, same, torch.ones_like(same, dtype=torch.bool), None
        )
        torch.testing.assert_close(grid[0, 1], grid[0, 5])
        assert run.tolist() == [5]
    with pytest.raises(ConfigError):
        TINY.replace(image_grid=2, image_first=90, image_count=20).validate()


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_presets_and_validation() -> None:
    assert (TINY.vocab_size, TINY.dim, TINY.n_layers) == (100, 32, 2)
    small = GeneratorConfig.preset("small")
    assert small.max_seq_len >= 800 and small.vocab_size >= 13 + 1024 + 512
    assert GeneratorConfig.from_json(small.to_json()) == small
    with pytest.raises(ConfigError, match="RoPE"):
        GeneratorConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError):
        GeneratorConfig.from_dict({**TINY.to_dict(), "n_kv_heads": 2})


def test_shapes_finite_loss_and_backward(model: Generator) -> None:
    model.train()
    ids = _ids(3, 20)
    logits = model(ids)
    assert logits.shape == (3, 20, TINY.vocab_size)
    loss = functional.cross_entropy(
        logits[:, :-1].reshape(-1, TINY.vocab_size), ids[:, 1:].flatten()
    )
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(
        torch.log(torch.tensor(100.0)).item(), abs=0.3
    )  # ~uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_causal(model: Generator) -> None:
    ids = _ids(2, 16)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=ATOL, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_depends_only_on_relative_position() -> None:
    cos, sin = rope_tables(8, 64, 10_000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        rq = apply_rope(q, cos[m].view(1, 1, 1, 4), sin[m].view(1, 1, 1, 4))
        rk = apply_rope(k, cos[n].view(1, 1, 1, 4), sin[n].view(1, 1, 1, 4))
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(30, 26), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    assert float(apply_rope(q, cos[5].view(1, 1, 1, 4), sin[5].view(1, 1, 1, 4)).norm()) == (
        pytest.approx(float(q.norm()), abs=1e-5)
    )


def test_kv_cache_equals_the_full_forward(model: Generator) -> None:
    ids = _ids(2, 24)
    full = model(ids)  # (2, 24, V)
    cache = model.new_cache(2, 24)
    pieces = [model(ids[:, :10], cache=cache)]  # prefill 10, then chunks of 1 and 5
    for t in range(10, 19):
        pieces.append(model(ids[:, t : t + 1], cache=cache))
    pieces.append(model(ids[:, 19:24], cache=cache))
    assert cache.length == 24 and cache.next_position.tolist() == [24, 24]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=1e-4)


def _greedy_without_cache(model: Generator, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_greedy_with_cache_matches_greedy_without(model: Generator) -> None:
    prompt = _ids(3, 8)
    cached = model.generate_greedy(prompt, max_new_tokens=20)
    assert cached.shape == (3, 28)
    assert torch.equal(cached, _greedy_without_cache(model, prompt, 20))


def test_left_padded_batch_equals_each_prompt_alone(model: Generator) -> None:
    prompts = [_ids(1, n, seed=n)[0] for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)  # pad id 0; its value must not matter
    mask = torch.zeros(3, width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = True
    logits = model(ids, attention_mask=mask)
    batch = model.generate_greedy(ids, max_new_tokens=12, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model(p[None])
        torch.testing.assert_close(logits[row, width - len(p) :], alone[0], atol=ATOL, rtol=1e-4)
        expected = _greedy_without_cache(model, p[None], 12)[0, len(p) :]
        assert torch.equal(batch[row, width:], expected), row
    ids[1, 0] = 77  # another pad value (row 1 has 5 pads) changes nothing for its real tokens
    again = model(ids, attention_mask=mask)
    torch.testing.assert_close(again[1, width - 4 :], logits[1, width - 4 :], atol=ATOL, rtol=0)


HINTED = TINY.replace(hint_slots=2, hint_codes=40, text_hints=True)


@pytest.mark.parametrize("config", [TINY, GRID, HINTED], ids=["plain", "image-grid", "hinted"])
def test_step_is_the_forward_bit_for_bit(config: GeneratorConfig) -> None:
    """`step` (the decoding loop's path without module calls) gives the very logits and cache
    `forward` gives, on an unpadded cache; on a padded one it is `forward` itself."""
    torch.manual_seed(0)
    model = Generator(config).eval()
    with torch.no_grad():  # non-zero text hint maps, so the text hints count
        if model.text_hint_maps is not None:
            model.text_hint_maps.normal_(std=0.05)
    ids = _ids(2, 30, seed=3)
    hints = None
    if config.hint_slots:
        top = config.hint_codes + config.vocab_size
        hints = torch.randint(-1, top, (2, 30, 2), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        a, b = model.new_cache(2, 30), model.new_cache(2, 30)
        first = None if hints is None else hints[:, :12]
        model(ids[:, :12], cache=a, hints=first)
        model(ids[:, :12], cache=b, hints=first)
        for t in range(12, 30):
            h = None if hints is None else hints[:, t : t + 1]
            expected = model(ids[:, t : t + 1], cache=a, hints=h)[:, -1]
            assert torch.equal(model.step(ids[:, t : t + 1], b, h), expected), t
        for name in ("valid", "next_position", "image_run"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.length == b.length == 30
        for layer in range(config.n_layers):
            assert torch.equal(a.keys[layer], b.keys[layer])
            assert torch.equal(a.values[layer], b.values[layer])
        # A left-padded cache (two prompts of different lengths) takes the masked forward.
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, :5] = False
        c, d = model.new_cache(2, 14), model.new_cache(2, 14)
        model(ids[:, :12], attention_mask=mask, cache=c)
        model(ids[:, :12], attention_mask=mask, cache=d)
        assert not d.unpadded(12)
        for t in range(12, 14):
            expected = model(ids[:, t : t + 1], cache=c)[:, -1]
            assert torch.equal(model.step(ids[:, t : t + 1], d), expected)
        with pytest.raises(ValueError, match="exceeds"):
            model.step(ids[:, :1], a)


def test_step_without_torchscript_is_the_same_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch cannot script `_blocks_step`, `step` runs it as Python: the same logits."""
    torch.manual_seed(0)
    model = Generator(TINY).eval()
    ids = _ids(2, 12, seed=6)
    with torch.inference_mode():
        a, b = model.new_cache(2, 12), model.new_cache(2, 12)
        model(ids[:, :9], cache=a)
        model(ids[:, :9], cache=b)
        scripted = [model.step(ids[:, t : t + 1], a) for t in range(9, 12)]
        monkeypatch.setattr(generator_module, "_blocks_step_fn", lambda: _blocks_step)
        plain = [model.step(ids[:, t : t + 1], b) for t in range(9, 12)]
    for x, y in zip(scripted, plain, strict=True):
        assert torch.equal(x, y)


def test_step_follows_the_weights_after_a_conversion() -> None:
    """`step` keeps the blocks' weights between tokens; a conversion must not leave it on the
    old tensors."""
    torch.manual_seed(0)
    model = Generator(TINY).eval()
    ids = _ids(1, 10, seed=5)
    with torch.inference_mode():
        cache = model.new_cache(1, 10)
        model(ids[:, :8], cache=cache)
        model.step(ids[:, 8:9], cache)  # the weights are now kept
        model.double()
        a, b = model.new_cache(1, 10), model.new_cache(1, 10)
        model(ids[:, :8], cache=a)
        model(ids[:, :8], cache=b)
        expected = model(ids[:, 8:9], cache=a)[:, -1]
        got = model.step(ids[:, 8:9], b)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)


def test_cache_overflow_and_max_len_are_errors(model: Generator) -> None:
    cache = model.new_cache(1, 8)
    model(_ids(1, 6), cache=cache)
    with pytest.raises(ValueError, match="exceeds"):
        model(_ids(1, 3), cache=cache)
    with pytest.raises(ValueError, match="exceeds"):
        model(_ids(1, TINY.max_seq_len + 1))


def test_tiny_batch_overfits() -> None:
    torch.manual_seed(0)
    model = Generator(TINY).train()
    ids = _ids(4, 32, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        logits = model(ids[:, :-1])
        loss = functional.cross_entropy(logits.reshape(-1, TINY.vocab_size), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # ~ln(100) at the start
    assert losses[-1] < 0.05, losses[-1]  # memorised 124 random next tokens


def test_save_load_round_trip(model: Generator, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "gen")
    loaded = Generator.from_pretrained(tmp_path / "gen")
    assert loaded.config == model.config and not loaded.training
    ids = _ids(2, 12)
    assert torch.equal(loaded(ids), model(ids))
    assert torch.equal(loaded.generate_greedy(ids, 5), model.generate_greedy(ids, 5))
    TINY.replace(dim=64).save(tmp_path / "gen" / "config.json")
    with pytest.raises(RuntimeError):
        Generator.from_pretrained(tmp_path / "gen")


def test_parameter_count_of_the_small_preset() -> None:
    small = Generator(GeneratorConfig.preset("small"))
    assert (
        small.num_parameters(embeddings=False)
        == 6 * (4 * 192 * 192 + 3 * 192 * 512 + 2 * 192) + 192
    )
    assert small.num_parameters() - small.num_parameters(embeddings=False) == 2 * 1600 * 192


def test_embeds_input_equals_ids_input() -> None:
    torch.manual_seed(0)
    model = Generator(GeneratorConfig.preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        by_ids = model(ids)
        by_embeds = model(embeds=model.embed(ids))
    torch.testing.assert_close(by_ids, by_embeds)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, embeds=model.embed(ids))
