"""Continual-learning metrics from an accuracy matrix.

Convention (docs/results-schema.md): ``A[i][t]`` is the top-1 accuracy (%) on task ``i``'s test set
after training task ``t``; ``None`` where ``i > t``. A run in progress has only its first columns
filled, so every metric is computed on the leading *complete* columns: with ``n`` of them the last
trained task is ``T = n - 1``.

Definitions follow the design note (section 5), not the released code:

- final accuracy ``A_T = mean_i a[i][T]``; incremental accuracy ``mean_t A_t``;
- forgetting ``mean over i < T of (max_{t < T} a[i][t] - a[i][T])`` (the released code takes the max
  over ``t <= T``, which clips negative forgetting to 0);
- backward transfer ``mean over i < T of (a[i][T] - a[i][i])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Matrix = Sequence[Sequence[float | None]]


def validate_matrix(A: Matrix) -> int:
    """Check shape and values of ``A``; return its number of tasks. Raises ValueError naming the entry."""
    T = len(A)
    if T == 0:
        raise ValueError("accuracy matrix has no tasks")
    for i, row in enumerate(A):
        if len(row) != T:
            raise ValueError(f"row {i} has {len(row)} entries, expected {T} (the matrix must be square)")
        for t, a in enumerate(row):
            _check_entry(a, i, t)
    _check_fill_order(A)
    return T


def _check_entry(a: Any, i: int, t: int) -> None:
    if a is None:
        return
    if i > t:
        raise ValueError(f"[{i}][{t}] must be null: task {i} is not trained after task {t}")
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, float, np.integer, np.floating)):
        raise ValueError(f"[{i}][{t}] must be a number or null, got {a!r}")
    if not 0.0 <= a <= 100.0 or not math.isfinite(a):  # range first: an int too large for a float is out
        raise ValueError(f"[{i}][{t}] = {a!r} is not an accuracy in [0, 100]")


def _check_fill_order(A: Matrix) -> None:
    # Tasks are evaluated in order, so column t may hold values only once column t-1 is complete.
    for t in range(1, len(A)):
        has_values = any(A[i][t] is not None for i in range(t + 1))
        if has_values and not _column_complete(A, t - 1):
            raise ValueError(f"column {t} has values but column {t - 1} is incomplete")


def _column_complete(A: Matrix, t: int) -> bool:
    return all(A[i][t] is not None for i in range(t + 1))


def tasks_done(A: Matrix) -> int:
    """Number of leading columns whose entries ``i <= t`` are all filled."""
    n = 0
    while n < len(A) and _column_complete(A, n):
        n += 1
    return n


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def average_accuracy(A: Matrix, t: int) -> float:
    """``A_t``: mean accuracy over tasks ``0..t`` after training task ``t``."""
    return _mean([float(A[i][t]) for i in range(t + 1)])


def accuracy_curve(A: Matrix) -> list[float]:
    """``[A_0, A_1, ...]`` over the complete columns."""
    return [average_accuracy(A, t) for t in range(tasks_done(A))]


def final_accuracy(A: Matrix) -> float | None:
    n = tasks_done(A)
    return average_accuracy(A, n - 1) if n else None


def incremental_accuracy(A: Matrix) -> float | None:
    curve = accuracy_curve(A)
    return _mean(curve) if curve else None


def forgetting(A: Matrix) -> float | None:
    """Mean drop from each old task's best earlier accuracy; None with fewer than two tasks done."""
    return _mean_drop_from_best(A, best_includes_final=False)


def released_forgetting(A: Matrix) -> float | None:
    """Forgetting as the released code computes it, the definition of the paper's numbers: the max runs
    over ``t <= T``, so a task whose final accuracy is its best counts 0, never less. Only for comparing
    with those numbers; pgpcl reports :func:`forgetting`. None with fewer than two tasks done."""
    return _mean_drop_from_best(A, best_includes_final=True)


def _mean_drop_from_best(A: Matrix, best_includes_final: bool) -> float | None:
    T = tasks_done(A) - 1
    if T < 1:
        return None
    stop = T + 1 if best_includes_final else T
    return _mean([max(float(A[i][t]) for t in range(i, stop)) - float(A[i][T]) for i in range(T)])


def backward_transfer(A: Matrix) -> float | None:
    """Mean change of each old task since it was learned; None with fewer than two tasks done."""
    T = tasks_done(A) - 1
    if T < 1:
        return None
    return _mean([float(A[i][T]) - float(A[i][i]) for i in range(T)])


def summarize(A: Matrix) -> dict[str, Any]:
    """All scalar metrics on the complete columns of ``A`` (values None when not defined yet).

    Raises ValueError for a matrix that is not one (:func:`validate_matrix`): a NaN, a value below the
    diagonal or a ragged row would otherwise give NaN metrics or silently drop entries.
    """
    validate_matrix(A)
    return {
        "final_acc": final_accuracy(A),
        "avg_inc_acc": incremental_accuracy(A),
        "forgetting": forgetting(A),
        "bwt": backward_transfer(A),
        "num_tasks_done": tasks_done(A),
    }


def accuracy_from_counts(correct: int, total: int) -> float:
    """Top-1 accuracy in percent."""
    if total <= 0:
        raise ValueError(f"cannot compute an accuracy over {total} samples")
    if not 0 <= correct <= total:
        raise ValueError(f"{correct} correct out of {total} samples is not a count of correct predictions")
    return 100.0 * float(correct) / float(total)


def accuracy_row_from_counts(correct: Sequence[int], total: Sequence[int]) -> list[float]:
    """Per-task accuracies (%) from per-task correct and total counts."""
    if len(correct) != len(total):
        raise ValueError(f"{len(correct)} correct counts but {len(total)} totals")
    return [accuracy_from_counts(c, n) for c, n in zip(correct, total)]


class AccuracyMatrix:
    """A ``T x T`` accuracy matrix filled one evaluation at a time."""

    def __init__(self, num_tasks: int):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self._a: list[list[float | None]] = [[None] * num_tasks for _ in range(num_tasks)]

    def set(self, i: int, t: int, acc: float) -> None:
        """Record the accuracy on task ``i`` after training task ``t``."""
        if not 0 <= i <= t < self.num_tasks:
            raise IndexError(f"need 0 <= i <= t < {self.num_tasks}, got i={i}, t={t}")
        acc = float(acc)
        _check_entry(acc, i, t)
        self._a[i][t] = acc

    def set_column(self, t: int, accs: Sequence[float]) -> None:
        """Record accuracies on tasks ``0..t`` after training task ``t``."""
        if len(accs) != t + 1:
            raise ValueError(f"after task {t} expected {t + 1} accuracies, got {len(accs)}")
        for i, acc in enumerate(accs):
            self.set(i, t, acc)

    def get(self, i: int, t: int) -> float | None:
        return self._a[i][t]

    def to_list(self) -> list[list[float | None]]:
        return [list(row) for row in self._a]

    @classmethod
    def from_list(cls, rows: Matrix) -> AccuracyMatrix:
        m = cls(validate_matrix(rows))
        m._a = [[None if a is None else float(a) for a in row] for row in rows]
        return m

    def tasks_done(self) -> int:
        return tasks_done(self._a)

    def curve(self) -> list[float]:
        return accuracy_curve(self._a)

    def summary(self) -> dict[str, Any]:
        return summarize(self._a)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccuracyMatrix) and self._a == other._a

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_tasks={self.num_tasks}, done={self.tasks_done()})"
