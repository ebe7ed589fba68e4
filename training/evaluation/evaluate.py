"""Evaluation of a classifier on a dataset, shared by training, analysis and int8 export."""

from __future__ import annotations

import torch

from training.fit import distributed


def class_logits(out):
    """The class logits of a model's output (models with an ImageNet head return a pair)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def evaluate(model, data, criterion, d: distributed.Dist, collect: bool = False) -> dict:
    """Mean loss and accuracy of ``model`` over ``data`` (summed over all processes).

    With ``collect`` (one process), also the predicted class and its probability per image.
    """
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    y_true, y_pred, confidence = [], [], []
    for x, y in data:
        x, y = x.to(d.device), y.to(d.device)
        out = class_logits(model(x)).float()
        loss_sum += criterion(out, y).item() * len(y)
        conf, pred = out.softmax(1).max(1)
        correct += (pred == y).sum().item()
        seen += len(y)
        if collect:
            y_true += y.tolist()
            y_pred += pred.tolist()
            confidence += conf.tolist()
    loss_sum, correct, seen = distributed.all_sum(d, loss_sum, correct, seen)
    result = {"loss": loss_sum / seen, "acc": correct / seen, "correct": int(correct), "total": int(seen)}
    if collect:
        result["predictions"] = (y_true, y_pred, confidence)
    return result
