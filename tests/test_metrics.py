import math

import pytest

from pgpcl.engine.metrics import (
    AccuracyMatrix,
    accuracy_curve,
    accuracy_from_counts,
    accuracy_row_from_counts,
    backward_transfer,
    final_accuracy,
    forgetting,
    incremental_accuracy,
    released_forgetting,
    summarize,
    tasks_done,
    validate_matrix,
)

# Task 0 rises from 90 to 95 after task 1, then falls to 80 after task 2.
#   A_0 = 90;  A_1 = (95 + 70) / 2 = 82.5;  A_2 = (80 + 60 + 85) / 3 = 75
#   incremental = (90 + 82.5 + 75) / 3 = 82.5
#   forgetting: task 0: max(90, 95) - 80 = 15;  task 1: max(70) - 60 = 10  -> 12.5
#   BWT:        task 0: 80 - 90 = -10;          task 1: 60 - 70 = -10      -> -10
# so forgetting (12.5) differs from -BWT (10): forgetting measures the drop from the best, not the first.
RISE_THEN_FALL = [
    [90.0, 95.0, 80.0],
    [None, 70.0, 60.0],
    [None, None, 85.0],
]


def test_rise_then_fall_by_hand():
    A = RISE_THEN_FALL
    assert accuracy_curve(A) == pytest.approx([90.0, 82.5, 75.0])
    assert final_accuracy(A) == pytest.approx(75.0)
    assert incremental_accuracy(A) == pytest.approx(82.5)
    assert forgetting(A) == pytest.approx(12.5)
    assert backward_transfer(A) == pytest.approx(-10.0)
    assert summarize(A) == pytest.approx(
        {"final_acc": 75.0, "avg_inc_acc": 82.5, "forgetting": 12.5, "bwt": -10.0, "num_tasks_done": 3}
    )


def test_forgetting_uses_max_over_earlier_tasks_only():
    # Task 0 keeps improving: 50 -> 60 -> 70; task 1: 80 -> 80.
    #   design note: task 0: max(50, 60) - 70 = -10; task 1: 80 - 80 = 0  -> -5
    #   (the released max over t <= T would give max(50, 60, 70) - 70 = 0 -> 0)
    #   BWT: task 0: 70 - 50 = 20; task 1: 80 - 80 = 0 -> 10
    A = [[50.0, 60.0, 70.0], [None, 80.0, 80.0], [None, None, 40.0]]
    assert forgetting(A) == pytest.approx(-5.0)
    assert backward_transfer(A) == pytest.approx(10.0)
    assert final_accuracy(A) == pytest.approx((70 + 80 + 40) / 3)
    assert released_forgetting(A) == pytest.approx(0.0)  # what the published numbers are computed with
    assert released_forgetting(RISE_THEN_FALL) == pytest.approx(forgetting(RISE_THEN_FALL))  # equal when it drops
    assert released_forgetting([[88.0]]) is None
    assert released_forgetting([[90.0, 95.0, None], [None, 70.0, None], [None, None, None]]) == pytest.approx(0.0)


def test_single_task():
    A = [[88.0]]
    s = summarize(A)
    assert s["final_acc"] == pytest.approx(88.0)
    assert s["avg_inc_acc"] == pytest.approx(88.0)
    assert s["forgetting"] is None and s["bwt"] is None
    assert s["num_tasks_done"] == 1


def test_partially_filled_matrix_uses_complete_columns():
    # Two of three tasks trained: columns 0 and 1 of RISE_THEN_FALL.
    #   A_0 = 90, A_1 = 82.5 -> final 82.5, incremental 86.25
    #   forgetting: task 0: max(90) - 95 = -5;  BWT: 95 - 90 = 5
    A = [[90.0, 95.0, None], [None, 70.0, None], [None, None, None]]
    assert tasks_done(A) == 2
    assert summarize(A) == pytest.approx(
        {"final_acc": 82.5, "avg_inc_acc": 86.25, "forgetting": -5.0, "bwt": 5.0, "num_tasks_done": 2}
    )


def test_half_evaluated_column_is_ignored():
    A = [[90.0, 95.0, 80.0], [None, 70.0, None], [None, None, None]]
    validate_matrix(A)
    assert tasks_done(A) == 2
    assert final_accuracy(A) == pytest.approx(82.5)


def test_empty_matrix_has_no_metrics():
    s = summarize([[None, None], [None, None]])
    assert s == {"final_acc": None, "avg_inc_acc": None, "forgetting": None, "bwt": None, "num_tasks_done": 0}


@pytest.mark.parametrize(
    "A, needle",
    [
        ([], "no tasks"),
        ([[1.0, 2.0]], "square"),
        ([[1.0, 2.0], [3.0, 4.0]], "must be null"),
        ([[101.0]], "[0, 100]"),
        ([[math.nan]], "[0, 100]"),
        ([["90"]], "number"),
        ([[None, 5.0], [None, 5.0]], "column 0 is incomplete"),
    ],
)
def test_validate_matrix_rejects(A, needle):
    with pytest.raises(ValueError) as e:
        validate_matrix(A)
    assert needle in str(e.value)


@pytest.mark.parametrize("A", [[[90.0, math.nan], [None, 80.0]], [[90.0, 1.0, 2.0], [None, 80.0, 3.0]],
                               [[90.0, 1.0], [5.0, 80.0]], [[90.0], [None, 80.0]]])
def test_summarize_refuses_what_is_not_an_accuracy_matrix(A):
    # NaN metrics, a dropped column, an ignored entry or an IndexError before this
    with pytest.raises(ValueError):
        summarize(A)


def test_numpy_scalars_are_accuracies():
    import numpy as np

    assert summarize([[np.float32(50.0), np.int64(40)], [None, np.float64(80.0)]])["final_acc"] == pytest.approx(60.0)


def test_counts():
    with pytest.raises(ValueError, match="not a count of correct predictions"):
        accuracy_from_counts(5, 3)
    with pytest.raises(ValueError, match="not a count of correct predictions"):
        accuracy_from_counts(-1, 3)
    assert accuracy_from_counts(3, 4) == pytest.approx(75.0)
    assert accuracy_row_from_counts([1, 2], [2, 8]) == pytest.approx([50.0, 25.0])
    with pytest.raises(ValueError):
        accuracy_from_counts(0, 0)
    with pytest.raises(ValueError):
        accuracy_row_from_counts([1], [2, 3])


def test_accuracy_matrix_class():
    m = AccuracyMatrix(3)
    m.set_column(0, [90.0])
    m.set_column(1, [95.0, 70.0])
    assert m.tasks_done() == 2
    m.set(0, 2, 80.0)
    m.set(1, 2, 60.0)
    m.set(2, 2, 85.0)
    assert m.to_list() == RISE_THEN_FALL
    assert m.summary()["forgetting"] == pytest.approx(12.5)
    assert AccuracyMatrix.from_list(RISE_THEN_FALL) == m
    with pytest.raises(IndexError):
        m.set(2, 1, 50.0)
    with pytest.raises(ValueError):
        m.set(0, 0, 150.0)
    with pytest.raises(ValueError):
        m.set_column(1, [1.0])
    # to_list returns a copy: editing it leaves the matrix alone
    rows = m.to_list()
    rows[0][0] = 0.0
    assert m.get(0, 0) == 90.0
