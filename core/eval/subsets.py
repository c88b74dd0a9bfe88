"""Class-balanced, seeded label subsets for semi-supervised evaluation (1%, 10%, 100% of the labels).

The subset depends only on the dataset's labels, the fraction and the seed, never on the model, so kNN, the
linear probe, fine-tuning and the from-scratch baseline all see exactly the same labelled images (the protocol
of SimCLR's semi-supervised table, Chen et al. 2020, sec. 4.3 / appendix B.5, which uses fixed class-balanced
1% and 10% ImageNet subsets).

Two properties make results comparable across runs:

* **Balanced:** every class gets ``n // C`` or ``n // C + 1`` samples (counts equal within 1), unless a class
  has fewer samples than its share; then it gives all it has and the rest is spread over the other classes.
* **Nested:** for one seed, the 1% subset is contained in the 10% subset, which is contained in 100%: each class
  draws from one fixed seeded permutation and a seeded class order decides who gets the remainder, so a larger
  fraction only ever adds samples.
"""

from __future__ import annotations

import numpy as np

from sslrun.core.errors import ConfigError, DataError

__all__ = ["balanced_subset", "holdout_split", "subset_size"]


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}; e.g. 0.01 for 1% of the labels")


def subset_size(num_labelled: int, num_classes: int, fraction: float) -> int:
    """How many labelled samples a ``fraction`` subset holds: ``round(fraction * n)``, at least one per class."""
    _check_fraction(fraction)
    if fraction == 1.0:
        return num_labelled
    return min(num_labelled, max(num_classes, round(fraction * num_labelled)))


def _quotas(capacity: np.ndarray, total: int, class_order: np.ndarray) -> np.ndarray:
    """Per-class quotas summing to ``min(total, capacity.sum())`` (water-filling): a class whose capacity is below
    the equal share gives everything it has; the others get equal shares, the remainder going to the classes that
    come first in ``class_order`` (so uncapped classes are equal within 1)."""
    quota = np.zeros_like(capacity)
    remaining = min(total, int(capacity.sum()))
    open_classes = [int(c) for c in class_order if capacity[c] > 0]
    while open_classes:
        share = remaining // len(open_classes)
        capped = [c for c in open_classes if capacity[c] <= share]
        if not capped:
            break
        for c in capped:
            quota[c] = capacity[c]
            remaining -= int(capacity[c])
        open_classes = [c for c in open_classes if capacity[c] > share]
    if open_classes:
        share, extra = divmod(remaining, len(open_classes))
        for rank, c in enumerate(open_classes):
            quota[c] = share + (1 if rank < extra else 0)
    return quota


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0, num_classes: int | None = None) -> np.ndarray:
    """Indices (sorted, into ``labels``) of a class-balanced ``fraction`` of the labelled samples.

    Samples labelled ``-1`` (unlabelled) are never picked.

    Args:
        labels: ``(N,)`` integer class labels of the whole split, in the split's order.
        fraction: share of the labelled samples to keep, in (0, 1]; 1.0 keeps every labelled sample.
        seed: the subset's seed; the same ``(labels, fraction, seed)`` always gives the same indices.
        num_classes: number of classes (default: ``max(labels) + 1``).

    Returns:
        ``(n,)`` int64 indices in increasing order.

    Raises:
        ConfigError: ``fraction`` outside (0, 1].
        DataError: no labelled samples.

    Examples:
        >>> y = np.repeat(np.arange(10), 100)
        >>> idx = balanced_subset(y, 0.1, seed=0)
        >>> np.bincount(y[idx]).tolist()
        [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    """
    _check_fraction(fraction)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    labelled = np.flatnonzero(labels >= 0)
    if labelled.size == 0:
        raise DataError("the split has no labelled samples; evaluation needs labels (label -1 means unlabelled)")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if fraction == 1.0:
        return labelled
    counts = np.bincount(labels[labelled], minlength=num_classes)
    total = subset_size(labelled.size, int((counts > 0).sum()), fraction)
    # One generator, consumed in a fixed order (class order first, then one permutation per class), so the draw
    # does not depend on the fraction: that is what makes the subsets nested.
    rng = np.random.Generator(np.random.PCG64(seed))
    class_order = rng.permutation(num_classes)
    quota = _quotas(counts, total, class_order)
    picked = []
    for c in range(num_classes):
        members = labelled[labels[labelled] == c]
        perm = rng.permutation(members.size)
        picked.append(members[perm[: quota[c]]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` into (fit, held-out) with a class-balanced held-out ``fraction``.

    Used to tune the linear probe's weight decay without looking at the test split. Every class keeps at least
    one sample in the fit part; the held-out part is empty when no class has two samples.

    Returns:
        ``(fit, held)``: sorted int64 positions, disjoint, together covering every labelled position.
    """
    _check_fraction(fraction)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    labelled = np.flatnonzero(labels >= 0)
    if labelled.size == 0:
        return labelled, labelled
    counts = np.bincount(labels[labelled])
    capacity = np.maximum(counts - 1, 0)  # never hold out a class's last sample
    total = min(int(capacity.sum()), max(int((capacity > 0).sum()), round(fraction * labelled.size)))
    rng = np.random.Generator(np.random.PCG64(seed))
    quota = _quotas(capacity, total, rng.permutation(counts.size))
    held = []
    for c in range(counts.size):
        members = labelled[labels[labelled] == c]
        held.append(members[rng.permutation(members.size)[: quota[c]]])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    mask = np.zeros(labels.size, dtype=bool)
    mask[held_idx] = True
    fit = np.flatnonzero(~mask & (labels >= 0)).astype(np.int64)
    return fit, held_idx
