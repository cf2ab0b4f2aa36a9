"""Sampling, constraints, guidance and the KV cache against full recomputation."""

from __future__ import annotations

import pytest
import torch

from mmrag.models.ra_cm3.decoding import continuation_nll, decode, left_pad
from mmrag.models.ra_cm3.generator import Generator, GeneratorConfig
from mmrag.sampling import Sampling, allowed_mask


@pytest.fixture(scope="module")
def model() -> Generator:
    torch.manual_seed(0)
    return Generator(GeneratorConfig.preset("tiny").replace(max_seq_len=96)).eval()


PROMPTS = [[1, 5, 9, 13, 2], [1, 7, 3]]


def test_left_pad() -> None:
    ids, mask = left_pad(PROMPTS, pad_id=0)
    assert ids.tolist() == [[1, 5, 9, 13, 2], [0, 0, 1, 7, 3]]
    assert mask.sum(1).tolist() == [5, 3]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_decoding_equals_full_recomputation(model: Generator, guidance: float) -> None:
    uncond = [[1, 4], [1, 4]]
    allowed = allowed_mask(model.config.vocab_size, [(40, 60)], [2])
    kwargs = {"allowed": allowed, "uncond_prompts": uncond, "guidance": guidance}
    greedy = Sampling(temperature=0)
    cached = decode(model, PROMPTS, 12, sampling=greedy, **kwargs)  # type: ignore[arg-type]
    full = decode(model, PROMPTS, 12, sampling=greedy, use_cache=False, **kwargs)  # type: ignore[arg-type]
    assert cached.tokens == full.tokens
    assert cached.mean_nll == pytest.approx(full.mean_nll, rel=1e-4)
    assert all(40 <= t < 60 or t == 2 for row in cached.tokens for t in row)


def test_guidance_changes_the_distribution(model: Generator) -> None:
    greedy = Sampling(temperature=0)
    plain = decode(model, PROMPTS, 16, sampling=greedy)
    guided = decode(model, PROMPTS, 16, sampling=greedy, uncond_prompts=[[1], [1]], guidance=4.0)
    assert plain.tokens != guided.tokens


def test_stop_token_ends_a_row(model: Generator) -> None:
    out = decode(model, PROMPTS, 30, sampling=Sampling(temperature=0))
    first = out.tokens[0][0]
    stopped = decode(model, PROMPTS, 30, sampling=Sampling(temperature=0), stop_id=first)
    assert stopped.tokens[0] == [first]
    assert len(stopped.tokens[1]) >= 1


def test_mean_nll_is_the_continuation_perplexity(model: Generator) -> None:
    out = decode(model, PROMPTS, 10, sampling=Sampling(temperature=0))
    rescored = continuation_nll(model, PROMPTS, out.tokens)
    assert rescored == pytest.approx(out.mean_nll, rel=1e-4)


def test_seeded_sampling_is_reproducible(model: Generator) -> None:
    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return decode(model, PROMPTS, 10, sampling=Sampling(top_p=0.9), generator=g).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_copy_weight_draws_the_suggested_tokens(model: Generator) -> None:
    allowed = allowed_mask(model.config.vocab_size, [(40, 60)])
    sampled = Sampling(temperature=1.0)
    suggested = [[41 + i % 3 for i in range(12)], [-1] * 6 + [50] * 6]

    def run(weight: float, seed: int = 0) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        kwargs = {"allowed": allowed, "copy": suggested, "copy_weight": weight, "generator": g}
        return decode(model, PROMPTS, 12, sampling=sampled, **kwargs).tokens  # type: ignore[arg-type]

    copied = run(1.0)
    assert copied[0] == suggested[0]  # weight 1: every suggested token
    assert copied[1][6:] == suggested[1][6:]
    assert (
        run(0.0)
        == decode(
            model, PROMPTS, 12, allowed, sampled, generator=torch.Generator().manual_seed(0)
        ).tokens
    )  # weight 0: the plain decoder
    hits = [
        sum(a == b for a, b in zip(run(0.5, s)[0], suggested[0], strict=True)) for s in range(8)
    ]
    assert 0 < sum(hits) < 8 * 12  # in between: some suggestions taken, some not
    with pytest.raises(ValueError, match="copy row"):
        decode(model, PROMPTS, 12, copy=[[41] * 3, [41] * 3], copy_weight=0.5)
    with pytest.raises(ValueError, match="copy_weight"):
        decode(model, PROMPTS, 12, copy=suggested, copy_weight=1.5)


def test_a_suggestion_outside_the_allowed_tokens_is_ignored(model: Generator) -> None:
    allowed = allowed_mask(model.config.vocab_size, [(40, 60)])
    out = decode(
        model,
        PROMPTS,
        8,
        allowed,
        Sampling(temperature=0),
        copy=[[3] * 8, [70] * 8],
        copy_weight=1.0,
    )
    assert all(40 <= t < 60 for row in out.tokens for t in row)
