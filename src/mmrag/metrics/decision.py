"""Scores of a calibrated yes/no decision: F1, precision, recall, accuracy, ECE, Brier."""

from __future__ import annotations

from typing import Any

import torch


def decision_scores(
    probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5, bins: int = 10
) -> dict[str, Any]:
    """F1 / precision / recall of "yes" (GILL: generate; chat: show an image), accuracy, ECE,
    Brier and the reliability bins."""
    pred = probabilities >= threshold
    truth = labels > 0.5
    tp = float((pred & truth).sum())
    precision = tp / max(1.0, float(pred.sum()))
    recall = tp / max(1.0, float(truth.sum()))
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(probabilities, edges[1:-1])
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        if inside.any():
            conf, acc = float(probabilities[inside].mean()), float(truth[inside].float().mean())
            ece += float(inside.float().mean()) * abs(conf - acc)
            table.append(
                {
                    "bin": b,
                    "n": int(inside.sum()),
                    "confidence": round(conf, 4),
                    "generate_rate": round(acc, 4),
                }
            )
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "accuracy": float((pred == truth).float().mean()),
        "ece": ece,
        "brier": float((probabilities - labels).pow(2).mean()),
        "n": len(labels),
        "positives": int(truth.sum()),
        "reliability": table,
    }
