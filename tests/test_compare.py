"""handlers.optimize.compare, on which the export's round-trip check, the worker's choice of
an optimisation and many tests rely: what agrees, and what must never agree."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from handlers.optimize import RTOL, compare, optimized


def logits(rows: int = 4, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed)) * 5


def drifted(want: torch.Tensor, times_rtol: float) -> torch.Tensor:
    """``want`` with one value moved by ``times_rtol`` x RTOL of its scale (its largest
    magnitude): the smallest row's smallest value, so no top class can change."""
    got = want.clone()
    row = want.max(1).values.argmin()
    col = want[row].argmin()
    got[row, col] -= times_rtol * RTOL * want.abs().max()
    return got


def test_the_same_outputs_agree_exactly():
    want = logits()
    a = compare(want.clone(), want)
    assert a.ok and a.max_diff == 0 and a.relative == 0
    assert a.scale == want.abs().max().item()


def test_a_drift_within_the_tolerance_agrees_and_twice_it_does_not():
    want = logits()
    half, twice = compare(drifted(want, 0.5), want), compare(drifted(want, 2), want)
    # The relative difference is the drift over the scale, to float32 rounding of the
    # logits (1e-6 of it), far inside the factor 4 between the two cases.
    assert half.relative == pytest.approx(0.5 * RTOL, rel=1e-3) and half.ok
    assert twice.relative == pytest.approx(2 * RTOL, rel=1e-3) and not twice.ok
    assert twice.flipped_rows == 0  # refused for the drift alone


def test_each_output_is_measured_against_its_own_scale():
    """A small second output (an ImageNet head's probabilities, say) drifting by twice its
    own tolerance fails, though it is tiny beside the first output's scale."""
    big, small = logits() * 100, logits(seed=1).softmax(1)
    a = compare((big.clone(), drifted(small, 2)), (big, small))
    assert not a.ok and a.relative == pytest.approx(2 * RTOL, rel=1e-3)
    assert a.scale == small.abs().max().item()


def test_flipped_top_classes_are_counted_in_decisive_rows_only():
    want = torch.tensor([[10.0, 0.0, -1.0], [5.0, 5.0 - 0.5 * RTOL * 10, 0.0]])
    got = torch.tensor([[0.0, 10.0, -1.0], [5.0 - RTOL * 10, 5.0, 0.0]])
    a = compare(got, want)
    # Row 0 is decided by 10, far more than twice the tolerance (RTOL x 10), and flips;
    # row 1 is decided by half the tolerance: its flip is within what kernels may do.
    assert (a.decisive_rows, a.flipped_rows) == (1, 1) and not a.ok


@pytest.mark.parametrize("classes", [10, 1], ids=["logits", "scores"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_outputs_never_agree(bad, classes):
    """With one column (a score per row) no top class can flip, so the value itself must
    fail the comparison."""
    want = logits(classes=classes)
    got = want.clone()
    got[0, 0] = bad
    a = compare(got, want)
    assert not a.ok and a.relative == math.inf and "non-finite" in str(a)
    # A reference with the value is as unusable, and the same value on both sides too.
    assert not compare(want, got).ok and not compare(got, got.clone()).ok


def test_an_all_nan_output_never_agrees():
    want = logits()
    assert not compare(torch.full_like(want, math.nan), want).ok


@pytest.mark.parametrize("got_count", [1, 3])
def test_another_number_of_outputs_never_agrees(got_count):
    """A model that lost (or grew) an output, e.g. the ImageNet head beside the classes."""
    want = (logits(), logits(classes=1000, seed=2))
    got = (want[0].clone(), want[1].clone(), logits(seed=3))[:got_count]
    a = compare(got, want)
    assert not a.ok and f"{got_count} output tensors" in str(a)


def test_another_shape_never_agrees():
    want = logits(classes=5)
    # (4, 1) broadcasts against (4, 5): the difference would be computed, and could be small.
    got = want.max(1, keepdim=True).values
    a = compare(got, want)
    assert not a.ok and "shape (4, 1)" in str(a)
    assert not compare(want[:2].clone(), want).ok


def test_the_worker_keeps_the_loaded_model_when_the_optimised_one_answers_nan(caplog):
    model = torch.nn.Linear(8, 3).eval()

    def build(m):
        return lambda x: m(x) * math.nan

    with caplog.at_level(logging.WARNING, logger="handlers.optimize"):
        assert optimized(model, torch.randn(2, 8), build, "nan-maker") is model
    assert "nan-maker changed the outputs" in caplog.text and "non-finite" in caplog.text
