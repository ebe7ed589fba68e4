"""The linear probe: how far the pretrained features alone go on the user's classes.

A multinomial logistic regression on the frozen network's features (the input of its
classifier head: the average-pooled features of a CNN, the class token of a ViT),
fitted on the train split and scored on the test split, beside the fine-tuned result.
Fine-tuning that does not beat it has not helped. The L2 strength is chosen on the valid
split from a small grid, so the baseline is not handicapped by a default.

Implemented in torch (full-batch L-BFGS on standardised features, in float64), so
training needs no scikit-learn: on 1,300 images of 1,280 features a fit takes about a
second; extracting the features (one eval-mode pass over train, valid and test) is
the cost.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from training.data.datasets import loader
from training.evaluation.evaluate import class_logits

# L2 strengths (on the mean loss) tried on the valid split; 1 / (C n) in scikit-learn's
# terms, so for 1,000-10,000 images this spans C of about 0.01 to 100.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class _Features(Exception):
    """Raised by the hook once the head's input is known: nothing after it is computed."""

    def __init__(self, x: torch.Tensor):
        self.x = x


def head_module(model: nn.Module, head: str) -> nn.Module:
    """The classifier module ``head`` names, on the model or on a wrapper's ``model``."""
    for path in (head, f"model.{head}"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"no module {head!r} in {type(model).__name__}")


def _raise_features(module, args):
    raise _Features(torch.flatten(args[0], 1))


@torch.no_grad()  # not inference_mode: the features then feed an autograd fit
def features(
    model: nn.Module, head: str, dataset, batch_size: int, workers: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of ``dataset``: the input of the head, in eval mode."""
    was_training = model.training
    model.eval()
    hook = head_module(model, head).register_forward_pre_hook(_raise_features)
    xs, ys = [], []
    try:
        for x, y in loader(dataset, batch_size, False, workers):
            try:
                class_logits(model(x.to(device)))
            except _Features as f:
                xs.append(f.x.double().cpu())
                ys.append(y)
            else:
                raise ValueError(f"the head {head!r} is not called in the forward pass")
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(xs), torch.cat(ys)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising mean cross-entropy + l2 / 2 * |W|^2 (bias not penalised), by
    full-batch L-BFGS with a strong-Wolfe line search: the problem is convex and small.
    ``start``: a nearby solution to begin from (the next stronger L2's). ``max_iter`` as
    scikit-learn's default: on separable features a weak L2 converges slowly towards
    ever larger weights whose predictions no longer change."""
    w0, b0 = start or (
        torch.zeros(x.shape[1], num_classes, dtype=x.dtype),
        torch.zeros(num_classes, dtype=x.dtype),
    )
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def score(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
    correct = int(((x @ w + b).argmax(1) == y).sum())
    return {"acc": correct / len(y), "correct": correct, "total": len(y)}


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Features scaled by the train split's mean and standard deviation (constant ones kept
    at zero), so one L2 grid fits any network's feature scale."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-8)
    return [(t - mean) / std for t in (train, *others)]


def linear_probe(
    model: nn.Module, head: str, splits: dict, num_classes: int, batch_size: int, workers: int, device
) -> dict:
    """Fit on ``splits["train"]``, choose L2 on ``splits["valid"]``, score ``splits["test"]``
    (datasets with the eval transform). Does not draw from torch's global generator, so a
    run with the probe trains exactly as one without."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        data = {s: features(model, head, ds, batch_size, workers, device) for s, ds in splits.items()}
    xs = standardise(*(data[s][0] for s in ("train", "valid", "test")))
    (xtr, xva, xte), (ytr, yva, yte) = xs, (data[s][1] for s in ("train", "valid", "test"))
    fits, fit = {}, None
    for l2 in sorted(L2_GRID, reverse=True):  # strongest first: each warm-starts the next
        fits[l2] = fit = fit_logistic(xtr, ytr, num_classes, l2, fit)
    valid = {l2: score(*fit, xva, yva) for l2, fit in fits.items()}
    # Ties go to the stronger regularisation, the safer choice on few images.
    best = max(L2_GRID, key=lambda l2: (valid[l2]["correct"], l2))
    return {
        "test": score(*fits[best], xte, yte),
        "valid": valid[best],
        "train": score(*fits[best], xtr, ytr),
        "l2": best,
        "features": xtr.shape[1],
        "seconds": time.perf_counter() - t0,
    }


def with_transform(dataset, transform):
    """A shallow copy of an ImageFolder that reads the same files through ``transform``."""
    ds = copy.copy(dataset)
    ds.transform = transform
    return ds
