"""IoUMeter against intersections and unions counted by hand on 4x4 episodes.

Conventions (crnet/metrics.py): per class, intersection and union are summed over all its episodes before
dividing (not a mean of per-episode IoUs); mIoU is the mean over all the fold's classes, one without episodes
(or with an empty union) counting 0, as in hsnet and PFENet; FB-IoU is the
mean of background IoU and foreground IoU, each summed over all episodes; label 255 is left out of both.
Results are percentages. Expected values are exact fractions; 1e-9 absolute covers float rounding only.
"""

from __future__ import annotations

import math

import pytest
import torch

from crnet.metrics import IoUMeter

X = 255  # ignore
TOL = 1e-9


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)


def p(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# Episode A, class 1.
#   label        prediction
#   1 1 0 0      1 1 1 0
#   1 1 0 0      1 0 0 0
#   0 0 0 X      0 0 0 1
#   0 0 X X      0 0 0 1
# Foreground: label 1 = {00,01,10,11} (4); predicted 1 on valid pixels = {00,01,02,10} (the two 1s at
#   23 and 33 are on ignore pixels and do not count). I = {00,01,10} = 3, U = {00,01,02,10,11} = 5.
# Background: label 0 = {02,03,12,13,20,21,22,30,31} (9); predicted 0 on valid pixels =
#   {03,11,12,13,20,21,22,30,31} (9; 32 is ignore). I = 8 (all but 02 / 11), U = 9 + 9 - 8 = 10.
A_LABEL = t([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, X], [0, 0, X, X]])
A_PRED = p([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]])
A = {"fg": (3, 5), "bg": (8, 10)}

# Episode B, class 1: object is the top 3 rows, everything predicted foreground.
# Foreground: I = 12, U = 16. Background: label 0 = bottom row (4), predicted 0 nowhere: I = 0, U = 4.
B_LABEL = t([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
B_PRED = torch.ones(4, 4, dtype=torch.bool)
B = {"fg": (12, 16), "bg": (0, 4)}

# Episode C, class 2.
#   label        prediction
#   0 0 0 0      0 0 0 0
#   0 1 1 0      0 1 0 0
#   0 1 1 0      0 1 0 0
#   X X X X      1 1 1 1      (predictions on the ignore row do not count)
# Foreground: label 1 = {11,12,21,22}; predicted {11,21}: I = 2, U = 4.
# Background: label 0 = 8 pixels; predicted 0 on valid pixels = 12 - 2 = 10 (the 8 plus 12, 22): I = 8,
#   U = 10.
C_LABEL = t([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [X, X, X, X]])
C_PRED = p([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
C = {"fg": (2, 4), "bg": (8, 10)}

EPISODES = [(A_PRED, A_LABEL, 1), (B_PRED, B_LABEL, 1), (C_PRED, C_LABEL, 2)]


def meter_over(episodes, classes=(1, 2, 3)) -> IoUMeter:
    meter = IoUMeter(classes)
    for prediction, label, class_id in episodes:
        meter.update(prediction, label, class_id)
    return meter


@pytest.mark.parametrize(
    "prediction, label, counts", [(A_PRED, A_LABEL, A), (B_PRED, B_LABEL, B), (C_PRED, C_LABEL, C)]
)
def test_single_episode_counts(prediction, label, counts) -> None:
    meter = meter_over([(prediction, label, 1)], classes=(1,))
    assert (meter.intersection[1], meter.union[1]) == counts["fg"]
    assert meter.fb_intersection == [counts["bg"][0], counts["fg"][0]]
    assert meter.fb_union == [counts["bg"][1], counts["fg"][1]]


def test_three_episodes_by_hand() -> None:
    result = meter_over(EPISODES).result()
    # Class 1 sums A and B: I = 3 + 12 = 15, U = 5 + 16 = 21 -> 71.428...%. The mean of the per-episode
    # IoUs would be (3/5 + 12/16) / 2 = 67.5%: the meter must give the former.
    class1 = 100 * 15 / 21
    assert result["per_class"]["1"] == pytest.approx(round(class1, 3), abs=TOL)
    assert abs(class1 - 100 * (3 / 5 + 12 / 16) / 2) > 3
    # Class 2: only C, 2 / 4.
    assert result["per_class"]["2"] == pytest.approx(50.0, abs=TOL)
    # Class 3 had no episode: it counts 0 in the mean over the three classes, and is named.
    assert result["per_class"]["3"] == 0.0 and result["classes_without_episodes"] == [3]
    assert result["miou"] == pytest.approx((class1 + 50.0 + 0.0) / 3, abs=TOL)  # 40.476...
    # FB-IoU: foreground I = 3 + 12 + 2 = 17, U = 5 + 16 + 4 = 25 -> 68%; background I = 8 + 0 + 8 = 16,
    # U = 10 + 4 + 10 = 24 -> 66.67%; mean 67.33%.
    assert result["fbiou"] == pytest.approx((100 * 17 / 25 + 100 * 16 / 24) / 2, abs=TOL)


def test_order_of_episodes_does_not_matter() -> None:
    forward = meter_over(EPISODES).result()
    backward = meter_over(EPISODES[::-1]).result()
    assert forward == backward


def test_predictions_on_ignore_pixels_do_not_count() -> None:
    # Invert the prediction on every ignore pixel: nothing may change.
    flipped = [(torch.where(label == X, ~pred, pred), label, c) for pred, label, c in EPISODES]
    assert meter_over(flipped).result() == meter_over(EPISODES).result()


def test_all_ignore_episode_adds_nothing() -> None:
    ignore = t([[X] * 4] * 4)
    with_ignore = meter_over([*EPISODES, (torch.ones(4, 4, dtype=torch.bool), ignore, 1)])
    assert with_ignore.result() == meter_over(EPISODES).result()


def test_perfect_and_inverted_predictions() -> None:
    perfect = meter_over([(A_LABEL == 1, A_LABEL, 1)], classes=(1,)).result()
    assert perfect["miou"] == pytest.approx(100.0, abs=TOL)
    assert perfect["fbiou"] == pytest.approx(100.0, abs=TOL)
    # Predict the exact opposite on valid pixels: no overlap for either side.
    inverted = meter_over([(A_LABEL == 0, A_LABEL, 1)], classes=(1,)).result()
    assert inverted["miou"] == 0.0 and inverted["fbiou"] == 0.0


def test_class_with_empty_union_counts_zero() -> None:
    # Class 2's only episode has no object and none is predicted: union 0, IoU 0 (hsnet clamps the union
    # to 1). Its 12 valid pixels are all background and all predicted background.
    empty_label = t([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [X, X, X, X]])
    meter = meter_over([(A_PRED, A_LABEL, 1), (torch.zeros(4, 4, dtype=torch.bool), empty_label, 2)], (1, 2))
    result = meter.result()
    assert result["per_class"] == {"1": 60.0, "2": 0.0} and result["classes_without_episodes"] == []
    assert result["miou"] == pytest.approx(30.0, abs=TOL)
    # Background: I = 8 + 12 = 20, U = 10 + 12 = 22; foreground as A alone: 3 / 5.
    assert result["fbiou"] == pytest.approx((100 * 20 / 22 + 60.0) / 2, abs=TOL)


def test_empty_meter() -> None:
    result = IoUMeter((1, 2)).result()
    assert result["miou"] == 0.0 and result["per_class"] == {"1": 0.0, "2": 0.0}
    assert result["classes_without_episodes"] == [1, 2] and math.isnan(result["fbiou"])


def test_rectangular_labels() -> None:
    # The meter works at the label's own (non-square) resolution: a 2x3 label, 1 row of object.
    # label 1 1 1 / 0 0 X, prediction 1 0 1 / 1 0 1: fg I = 2, U = 3 + 1 (pixel 10) = 4;
    # bg label 0 = {10, 11}, predicted 0 on valid = {01, 11}: I = 1, U = 3.
    label = t([[1, 1, 1], [0, 0, X]])
    prediction = p([[1, 0, 1], [1, 0, 1]])
    result = meter_over([(prediction, label, 4)], classes=(4,)).result()
    assert result["per_class"] == {"4": 50.0}
    assert result["fbiou"] == pytest.approx((100 * 1 / 3 + 50.0) / 2, abs=TOL)
