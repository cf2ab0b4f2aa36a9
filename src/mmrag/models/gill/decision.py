"""GILL's retrieve-or-generate decision: where its labels come from, its features, fitting,
calibration and scores.

Labels. GILL trained its classifier on human preferences between a retrieved and a generated
image; we have none, so the label says whether retrieval *can* answer: a user asks for an
emoji by name ("Show me {name}.", a seeded template); the memory holds a seeded half of the
families of the split (every variant of a family in or out together) besides all training
documents; label 1 (generate) when the asked-for family is absent from the memory, 0
(retrieve) when it is present. The memory's vectors are the `fromage` encoder's (mixed-modal
caption + image). The decision is fitted on the *validation* families (unseen by the
adapters, like deployment prompts), its regularisation chosen and its temperature scaled on
a held-back 30% of them, and it is scored on the held-out families: F1 of "generate",
accuracy, expected calibration error (10 bins) and the Brier score, against ablations (each
feature group alone; GILL's own inputs, the `[IMG0]` state and its retrieval scores, without
the evidence check), the best-score threshold rule and always generating.

Features (`model.Decision`): exactly what `Gill.image_part` computes in a chat: the `[IMG0]`
state after the user's turn, the scores of the `[IMG0]` query's top k documents, and
the request's overlap with the captions of its top `evidence_k` documents.

`refit_decision` reruns only this stage on a trained GILL folder (`mmrag train gill
--decision-only`): the mapper and the heads are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional

from mmrag.encoders.mixed import combine
from mmrag.metrics.decision import decision_scores as scores
from mmrag.models.fromage.conversation import REQUEST_TEMPLATES, Message, chat_row
from mmrag.models.fromage.model import TokenRow
from mmrag.models.fromage.pairs import PairData
from mmrag.models.gill.model import Decision, Gill, request_overlap

if TYPE_CHECKING:
    from mmrag.models.gill.train_config import GillTrainConfig

logger = logging.getLogger(__name__)

REGULARISATION = (1e-3, 1e-2, 1e-1, 1.0)  # L2 on the [IMG0] read-out, chosen on held-back data
# Which parameter groups of `Decision` each variant fits: "combined" is the shipped design,
# "gill" GILL's own inputs (the prompt's state and the retrieval scores) without the evidence.
VARIANTS: dict[str, tuple[str, ...]] = {
    "combined": ("hidden", "scores", "evidence"),
    "gill": ("hidden", "scores"),
    "state_only": ("hidden",),
    "scores_only": ("scores",),
    "evidence_only": ("evidence",),
}


@dataclasses.dataclass
class DecisionSet:
    states: torch.Tensor  # (N, H) [IMG0] states of the prompts
    top: torch.Tensor  # (N, k) retrieval scores against the memory, best first
    overlap: torch.Tensor  # (N,) the request's overlap with the evidence captions
    labels: torch.Tensor  # (N,) 1.0 = generate (the family is absent)
    groups: list[str]

    def subset(self, keep: np.ndarray) -> DecisionSet:
        t = torch.from_numpy(keep)
        return DecisionSet(
            self.states[t],
            self.top[t],
            self.overlap[t],
            self.labels[t],
            [g for g, k in zip(self.groups, keep, strict=True) if k],
        )


def present_groups(data: PairData, index: np.ndarray, fraction: float, seed: int) -> set[str]:
    """A seeded `fraction` of the split's families, kept in the decision memory."""
    names = sorted({data.pairs.groups[int(i)] for i in index})
    order = np.random.default_rng([seed, 17]).permutation(len(names))
    return {names[j] for j in order[: round(fraction * len(names))]}


@torch.no_grad()
def memory_vectors(gill: Gill, data: PairData, index: np.ndarray) -> torch.Tensor:
    """(M, R) the `fromage` encoder's vectors of these documents (caption + image, combined)."""
    model = gill.model
    rows = [TokenRow(list(data.captions[int(i)])) for i in index]
    text = model.adapters.project_text(model.special_states(rows, [model.ret_id])[:, 0])
    image = model.adapters.project_image(data.features[index])
    return torch.from_numpy(combine([text.numpy(), image.numpy()]))


@torch.no_grad()
def decision_set(
    gill: Gill,
    data: PairData,
    index: np.ndarray,
    present: set[str],
    memory: torch.Tensor,
    stored: np.ndarray,
    seed: int,
) -> DecisionSet:
    """The decision's inputs for a chat request per pair of `index`, against `memory` (the
    vectors of the `stored` documents)."""
    model, config = gill.model, gill.config
    rng = np.random.default_rng([seed, 19])
    requests = [
        REQUEST_TEMPLATES[int(rng.integers(len(REQUEST_TEMPLATES)))].format(
            data.pairs.texts[int(i)]
        )
        for i in index
    ]
    rows = [chat_row(model, [Message("user", [r])]) for r in requests]
    states = model.special_states(rows, [model.img_ids[0]])[:, 0]  # (N, H)
    scores = gill.heads.query(states) @ memory.T  # (N, M)
    k = min(max(config.top_k, config.evidence_k), scores.shape[1])
    top, nearest = scores.topk(k, dim=1)  # (N, k)
    captions = [[data.pairs.texts[int(stored[j])] for j in row] for row in nearest.tolist()]
    overlap = torch.tensor(
        [
            request_overlap(r, c[: config.evidence_k])
            for r, c in zip(requests, captions, strict=True)
        ]
    )
    groups = [data.pairs.groups[int(i)] for i in index]
    labels = torch.tensor([0.0 if g in present else 1.0 for g in groups])
    return DecisionSet(states, top[:, : config.top_k], overlap, labels, groups)


def fit(decision: Decision, data: DecisionSet, variant: str, l2: float, steps: int = 300) -> None:
    """Logistic regression (full-batch L-BFGS) of the chosen variant; temperature reset to 1."""
    with torch.no_grad():
        decision.temperature.fill_(1.0)
        for p in decision.parameters():
            p.zero_()
    groups = VARIANTS[variant]
    params = [getattr(decision, g).weight for g in groups] + [decision.scores.bias]
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = decision.logit(data.states, data.top, data.overlap)
        loss = functional.binary_cross_entropy_with_logits(logits, data.labels)
        loss = loss + l2 * decision.hidden.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def fit_temperature(decision: Decision, data: DecisionSet) -> None:
    """Temperature scaling (Guo et al. 2017) on held-back data: one scalar, NLL."""
    with torch.no_grad():
        logits = decision.logit(data.states, data.top, data.overlap)
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = functional.binary_cross_entropy_with_logits(logits / log_t.exp(), data.labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    decision.temperature.fill_(float(log_t.detach().exp()))


def probabilities(decision: Decision, data: DecisionSet) -> torch.Tensor:
    with torch.no_grad():
        return decision.probability(data.states, data.top, data.overlap)


def split_by_group(
    data: DecisionSet, fraction: float, seed: int
) -> tuple[DecisionSet, DecisionSet]:
    names = sorted(set(data.groups))
    order = np.random.default_rng([seed, 23]).permutation(len(names))
    held = {names[j] for j in order[: round(fraction * len(names))]}
    keep = np.array([g in held for g in data.groups])
    return data.subset(~keep), data.subset(keep)


def choose(gill: Gill, train: DecisionSet, calib: DecisionSet) -> dict[str, dict[str, Any]]:
    """Each variant at its best regularisation (F1 on the held-back part), temperature-scaled
    there; the Gill's decision ends as the variant with the best held-back F1."""
    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        best: tuple[float, float, dict[str, torch.Tensor]] | None = None
        for l2 in REGULARISATION if "hidden" in VARIANTS[variant] else (0.0,):
            fit(gill.heads.decision, train, variant, l2)
            fit_temperature(gill.heads.decision, calib)
            f1 = scores(probabilities(gill.heads.decision, calib), calib.labels)["f1"]
            if best is None or f1 > best[0]:
                best = (f1, l2, {k: v.clone() for k, v in gill.heads.decision.state_dict().items()})
        assert best is not None
        results[variant] = {"calibration_f1": best[0], "l2": best[1], "state": best[2]}
    winner = max(VARIANTS, key=lambda v: results[v]["calibration_f1"])
    gill.heads.decision.load_state_dict(results[winner]["state"])
    results["chosen"] = {"variant": winner}
    return results


def fit_decision(
    gill: Gill, data: PairData, config: GillTrainConfig, progress: bool = True
) -> dict[str, Any]:
    """Stage 3: fit on validation families, score on held-out families (see the docstring)."""
    seed, fraction = config.seed, config.present_fraction
    present = present_groups(data, data.validation, fraction, seed) | present_groups(
        data, data.heldout, fraction, seed + 1
    )
    in_memory = np.array(
        [
            i
            for i in np.concatenate([data.validation, data.heldout])
            if data.pairs.groups[int(i)] in present
        ],
        dtype=np.int64,
    )
    stored = np.concatenate([data.train, in_memory])
    logger.info(
        "decision memory: %d documents; prompts: %d validation, %d held out",
        len(stored),
        len(data.validation),
        len(data.heldout),
    )
    memory = memory_vectors(gill, data, stored)
    val = decision_set(gill, data, data.validation, present, memory, stored, seed)
    test = decision_set(gill, data, data.heldout, present, memory, stored, seed + 1)
    train, calib = split_by_group(val, 0.3, seed)
    chosen = choose(gill, train, calib)
    report: dict[str, Any] = {
        "memory_documents": len(stored),
        "chosen": chosen["chosen"]["variant"],
    }
    for variant in VARIANTS:
        decision = Decision(gill.model.language_model.hidden_size)
        decision.load_state_dict(chosen[variant]["state"])
        report[variant] = {
            "l2": chosen[variant]["l2"],
            "calibration_f1": chosen[variant]["calibration_f1"],
        } | scores(probabilities(decision, test), test.labels)
    report["score_threshold"] = threshold_baseline(val, test)
    report["always_generate"] = scores(torch.ones(len(test.labels)), test.labels)
    report["heldout"] = {k: v for k, v in report[report["chosen"]].items() if k != "reliability"}
    report["labels"] = "1 = generate: the asked-for family is absent from the memory"
    return report


def threshold_baseline(train: DecisionSet, test: DecisionSet) -> dict[str, Any]:
    """The simplest rule: generate when the best match scores below a threshold (chosen for
    F1 on `train`)."""
    best = max(
        np.unique(train.top[:, 0].numpy()),
        key=lambda t: scores((train.top[:, 0] < t).float(), train.labels)["f1"],
    )
    return scores((test.top[:, 0] < float(best)).float(), test.labels) | {"threshold": float(best)}


def refit_decision(
    out: Path, data: Sequence[Path], cache_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Stage 3 alone on the GILL folder `out` (its train-config.json and checkpoint): the
    decision is refitted and saved, `metrics.json`'s "decision" replaced."""
    from mmrag.checkpoints import checkpoint_dir
    from mmrag.models.fromage.pairs import load_pair_data
    from mmrag.models.fromage.train_config import FromageTrainConfig
    from mmrag.models.gill.train_config import METRICS_FILE, TRAIN_CONFIG_FILE, GillTrainConfig

    out = Path(out)
    config = GillTrainConfig.load(out / TRAIN_CONFIG_FILE)
    gill = Gill.from_pretrained(out, decision=False)
    fromage_dir = Path(config.fromage) if config.fromage else checkpoint_dir("fromage")
    split = FromageTrainConfig.load(fromage_dir / TRAIN_CONFIG_FILE)
    pairs = load_pair_data(
        data, gill.model, split.holdout, split.group_key, split.seed, cache_dir, progress
    )
    decision = fit_decision(gill, pairs, config, progress)
    gill.save_pretrained(out)
    path = out / METRICS_FILE
    metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    metrics["decision"] = decision
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
