"""How much of a selection result survives: held-out selection, bootstrap intervals, paired tests.

Every function here works on per-item outcomes, so it serves both workloads:
a retrieval query is recalled at K or not (0 or 1), a 2AFC triplet earns a
score in [0, 1]. Shapes use N items (queries or triplets), S subsets (or
metrics), F folds, R bootstrap resamples and C columns (for example one per
K of recall@K).

- Cross-validation (`assign_folds`, `fold_totals`, `rank_fold_counts`,
  `cross_validate`): the subset chosen on the other folds is scored on the
  held-out fold, so no item scores the subset that it helped to choose.
  `select_on_split` does the same with a given train/validation split.
- Bootstrap (`resample_totals`): every resample draws N items with
  replacement (within each stratum when strata are given), expressed as a
  count matrix [R, N] that multiplies the outcomes [N, S] in one matrix
  product. All rows share the same resamples, so the difference of two rows
  is a paired bootstrap.
- Paired tests (`sign_test`, `discordant_counts`, `holm_adjust`): the exact
  two-sided binomial test on the items where two rows differ, which for 0/1
  outcomes is the exact McNemar test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from engine import analysis

__all__ = [
    "CrossValidation",
    "Resamples",
    "assign_folds",
    "check_level",
    "cross_validate",
    "cross_validate_items",
    "cross_validate_reference",
    "discordant_counts",
    "fold_totals",
    "holm_adjust",
    "rank_fold_counts",
    "rank_fold_counts_reference",
    "resample_counts",
    "resample_totals",
    "resample_totals_reference",
    "select_on_split",
    "sign_test",
]

# Resamples drawn from one random stream. Fixing the block size (instead of
# deriving it from memory) keeps the resamples of a seed independent of the
# memory budget and of the device.
RESAMPLE_BLOCK = 64
# float32 adds integers exactly below 2^24, which bounds the exact path.
FLOAT32_EXACT_INTEGER = 1 << 24


def check_level(level: float) -> float:
    """Return `level` if it is a valid interval coverage in (0, 1), else raise."""
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"the interval level must lie in (0, 1), e.g. 0.95; got {level}.")
    return level


def _check_strata(strata: Any, num_items: int) -> np.ndarray | None:
    if strata is None:
        return None
    strata = np.asarray(strata)
    if strata.shape != (num_items,):
        raise ValueError(f"strata must be one label per item, shape ({num_items},); got shape {strata.shape}.")
    return np.unique(strata, return_inverse=True)[1]


# ----------------------------------------------------------------------------
# Folds.


def assign_folds(num_items: int, num_folds: int, *, seed: int, strata: Any = None) -> np.ndarray:
    """Assign every item to one of `num_folds` folds at random, balanced.

    Items are shuffled with `seed` and dealt to the folds in turn, so fold
    sizes differ by at most one. With `strata` (for example the 2AFC
    category of each triplet), each stratum is dealt separately, continuing
    where the previous one stopped, so every fold keeps the stratum
    proportions as closely as the counts allow.

    Args:
      num_items: N.
      num_folds: F, with 2 <= F <= N.
      seed: seed of the shuffle.
      strata: optional labels [N].

    Returns:
      int64 [N], the fold of each item.
    """
    if not 2 <= num_folds <= num_items:
        raise ValueError(f"cross-validation needs 2 <= folds <= items; got {num_folds} folds for "
                         f"{num_items} items. Use at most {num_items} folds (--cv_folds), or 0 to skip cross-validation.")
    rng = np.random.default_rng(seed)
    codes = _check_strata(strata, num_items)
    groups = [np.arange(num_items)] if codes is None else [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]
    folds = np.empty(num_items, np.int64)
    dealt = 0
    for members in groups:
        shuffled = rng.permutation(members)
        folds[shuffled] = (dealt + np.arange(shuffled.size)) % num_folds
        dealt += shuffled.size
    return folds


def _fold_indicator(folds: np.ndarray, num_folds: int) -> np.ndarray:
    folds = np.asarray(folds)
    if folds.ndim != 1 or folds.size == 0 or folds.min() < 0 or folds.max() >= num_folds:
        raise ValueError(f"folds must be a non-empty [N] array of values in [0, {num_folds}); "
                         f"got shape {folds.shape} with range [{folds.min(initial=0)}, {folds.max(initial=0)}].")
    return (folds[:, None] == np.arange(num_folds)[None, :]).astype(np.float32)


@jax.jit
def _binary_fold_counts(bits: jax.Array, indicator: jax.Array) -> jax.Array:
    # [S, N] x [N, F] with 0/1 entries: float32 sums of integers below 2^24 are exact.
    return jnp.matmul(bits.astype(jnp.float32), indicator, precision=jax.lax.Precision.HIGHEST)


def rank_fold_counts(ranks: np.ndarray, folds: np.ndarray, num_folds: int, ks: Sequence[int]) -> np.ndarray:
    """Count, per subset, fold and K, the queries recalled at K.

    Args:
      ranks: uint8/uint16/int [S, N], min(rank, K_max) per subset and query
        (`ModeResult.ranks`).
      folds: int [N], fold of each query.
      num_folds: F.
      ks: the K values.

    Returns:
      int64 [S, F, len(ks)].
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != np.asarray(folds).shape[0]:
        raise ValueError(f"ranks must be [S, N] with N = {np.asarray(folds).shape[0]} (one fold per query); "
                         f"got shape {ranks.shape}.")
    if ranks.shape[1] >= FLOAT32_EXACT_INTEGER:
        raise ValueError(f"{ranks.shape[1]} queries exceed the exact float32 count range (2^24).")
    indicator = jnp.asarray(_fold_indicator(folds, num_folds))
    device_ranks = jnp.asarray(ranks)
    counts = [jax.device_get(_binary_fold_counts(device_ranks < k, indicator)) for k in ks]
    return np.rint(np.stack(counts, axis=2)).astype(np.int64)


def rank_fold_counts_reference(ranks: np.ndarray, folds: np.ndarray, num_folds: int,
                               ks: Sequence[int]) -> np.ndarray:
    """Loop version of `rank_fold_counts` (int64 [S, F, K])."""
    ranks = np.asarray(ranks, np.int64)
    out = np.zeros((ranks.shape[0], num_folds, len(ks)), np.int64)
    for f in range(num_folds):
        held = np.asarray(folds) == f
        for j, k in enumerate(ks):
            out[:, f, j] = (ranks[:, held] < k).sum(axis=1)
    return out


def fold_totals(values: Any, folds: np.ndarray, num_folds: int) -> np.ndarray:
    """Sum per-item values [S, N] (or [N]) over the items of each fold: float64 [S, F]."""
    values = np.atleast_2d(np.asarray(values, np.float64))
    if values.shape[1] != np.asarray(folds).shape[0]:
        raise ValueError(f"values must be [S, N] with N = {np.asarray(folds).shape[0]} (one fold per item); "
                         f"got shape {values.shape}.")
    return values @ _fold_indicator(folds, num_folds).astype(np.float64)


# ----------------------------------------------------------------------------
# Held-out selection.


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """Subsets chosen on F − 1 folds and scored on the held-out fold, per group.

    A group is a set of candidate rows (all subsets, or the subsets of one
    size); each fold chooses the best row of every group from the totals of
    the other folds.

    Attributes:
      groups: G group names.
      chosen: int64 [G, F], the row chosen with fold f held out.
      held_out: [G, F, C] totals of the chosen row on the held-out fold.
      fold_sizes: int64 [F], items per fold.
      in_sample: int64 [G], the row chosen on all items.
    """

    groups: tuple[str, ...]
    chosen: np.ndarray
    held_out: np.ndarray
    fold_sizes: np.ndarray
    in_sample: np.ndarray

    def totals(self) -> np.ndarray:
        """Return [G, C] held-out totals summed over folds: each item scored once, by a row it did not choose."""
        return self.held_out.sum(axis=1)

    def times_chosen(self, group: str) -> dict[int, int]:
        """Return {row: number of folds that chose it} for one group, most chosen first."""
        rows, counts = np.unique(self.chosen[self.groups.index(group)], return_counts=True)
        order = np.lexsort((rows, -counts))
        return {int(rows[i]): int(counts[i]) for i in order}

    def item_rows(self, folds: np.ndarray) -> np.ndarray:
        """Return int64 [G, N], the row that scores each item (the one chosen without its fold)."""
        return self.chosen[:, np.asarray(folds)]


def _best_row(totals: np.ndarray, masks: np.ndarray, rows: np.ndarray) -> int:
    return int(rows[analysis.subset_order(totals[rows], masks[rows])[0]])


def cross_validate(fold_totals_: np.ndarray, masks: np.ndarray, groups: Mapping[str, np.ndarray], *,
                   folds: np.ndarray) -> CrossValidation:
    """Choose the best row of each group on the training folds and score it on the held-out fold.

    "Best" is the order of `engine.analysis.subset_order`: the highest total
    in column 0, then in the next columns, then the fewest members, then the
    lowest mask. Within one fold every row has the same training items, so
    ordering by totals equals ordering by means.

    Args:
      fold_totals_: [S, F, C] per-fold totals (`rank_fold_counts`, or
        `fold_totals(...)[..., None]` for scores).
      masks: int64 [S] subset masks, for tie-breaking.
      groups: group name -> rows of candidates.
      folds: int [N], the fold assignment behind the totals (for fold sizes).

    Returns:
      A CrossValidation.
    """
    totals = np.asarray(fold_totals_)
    if totals.ndim != 3 or totals.shape[0] != len(masks):
        raise ValueError(f"fold totals must be [S, F, C] with S = {len(masks)}; got shape {totals.shape}.")
    num_folds = totals.shape[1]
    names = tuple(groups)
    overall = totals.sum(axis=1)
    # Summing the other folds (not subtracting fold f from the total) gives
    # rows with equal training outcomes equal float totals, so ties still
    # fall to the size and mask order.
    training = [totals[:, np.arange(num_folds) != f].sum(axis=1) for f in range(num_folds)]
    chosen = np.empty((len(names), num_folds), np.int64)
    in_sample = np.empty(len(names), np.int64)
    for g, name in enumerate(names):
        rows = np.asarray(groups[name], np.int64)
        if rows.size == 0:
            raise ValueError(f"cross-validation group {name!r} has no candidate rows.")
        in_sample[g] = _best_row(overall, masks, rows)
        for f in range(num_folds):
            chosen[g, f] = _best_row(training[f], masks, rows)
    held_out = totals[chosen, np.arange(num_folds)[None, :]]
    fold_sizes = np.bincount(np.asarray(folds), minlength=num_folds).astype(np.int64)
    return CrossValidation(groups=names, chosen=chosen, held_out=held_out, fold_sizes=fold_sizes,
                           in_sample=in_sample)


def cross_validate_reference(values: np.ndarray, folds: np.ndarray, num_folds: int, masks: np.ndarray,
                             rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force held-out selection over per-item values [S, N, C] for one group.

    For each fold, only the items outside it are passed to the ordering, so
    the held-out items cannot influence the choice.

    Returns:
      chosen int64 [F] and held-out totals [F, C].
    """
    chosen = np.empty(num_folds, np.int64)
    held = np.empty((num_folds, values.shape[2]))
    for f in range(num_folds):
        train = values[:, np.asarray(folds) != f].sum(axis=1)
        chosen[f] = _best_row(train, masks, np.asarray(rows))
        held[f] = values[chosen[f], np.asarray(folds) == f].sum(axis=0)
    return chosen, held


def cross_validate_items(values: Any, masks: np.ndarray, groups: Mapping[str, np.ndarray], *, num_folds: int,
                         seed: int, strata: Any = None) -> tuple[np.ndarray, CrossValidation]:
    """Cross-validate the selection of rows of per-item scores [S, N] (for example 2AFC per triplet).

    The items are assigned to folds (within strata when given) and each
    group's best row by total score is chosen on the other folds.

    Returns:
      (folds int64 [N], CrossValidation with one column); the cross-validated
      mean score of group g is `cv.totals()[g, 0] / N`.
    """
    values = np.atleast_2d(np.asarray(values, np.float64))
    folds = assign_folds(values.shape[1], num_folds, seed=seed, strata=strata)
    totals = fold_totals(values, folds, num_folds)[..., None]
    return folds, cross_validate(totals, masks, groups, folds=folds)


def select_on_split(train: np.ndarray, test: np.ndarray, masks: np.ndarray, groups: Mapping[str, np.ndarray]
                    ) -> dict[str, dict[str, Any]]:
    """Choose each group's best row on a training split and report it on a test split.

    For 2AFC with both BAPPS splits: `train` and `test` are the scores [S, C]
    of the same subsets on the train and val triplets.

    Returns:
      group -> {"chosen_row", "train", "test", "test_best_row", "test_best"};
      "test_best" is the in-sample best on the test split (an optimistic figure).
    """
    train = np.asarray(train, np.float64).reshape(len(masks), -1)
    test = np.asarray(test, np.float64).reshape(len(masks), -1)
    out = {}
    for name, rows in groups.items():
        rows = np.asarray(rows, np.int64)
        chosen = _best_row(train, masks, rows)
        best = _best_row(test, masks, rows)
        out[name] = {"chosen_row": chosen, "train": train[chosen].tolist(), "test": test[chosen].tolist(),
                     "test_best_row": best, "test_best": test[best].tolist()}
    return out


# ----------------------------------------------------------------------------
# Bootstrap.


def _resample_block(rng: np.random.Generator, rows: int, strata_members: list[np.ndarray], num_items: int
                    ) -> np.ndarray:
    counts = np.zeros((rows, num_items), np.int32)
    offsets = (np.arange(rows) * num_items)[:, None]
    for members in strata_members:
        draws = members[rng.integers(0, members.size, size=(rows, members.size))]
        counts += np.bincount((offsets + draws).ravel(), minlength=rows * num_items).reshape(
            rows, num_items).astype(np.int32)
    return counts


def resample_counts(num_items: int, num_resamples: int, *, seed: int, strata: Any = None,
                    start: int = 0, stop: int | None = None) -> np.ndarray:
    """Return int32 [stop − start, N]: how often each item is drawn in resamples start..stop−1.

    Each row is a multinomial draw of N items with replacement (N_c within
    each stratum c). Resample r depends only on (seed, r), never on how the
    resamples are split into calls.
    """
    stop = num_resamples if stop is None else stop
    codes = _check_strata(strata, num_items)
    members = [np.arange(num_items)] if codes is None else [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]
    num_blocks = -(-num_resamples // RESAMPLE_BLOCK)
    seeds = np.random.SeedSequence(seed).spawn(num_blocks)
    parts = []
    for block in range(start // RESAMPLE_BLOCK, -(-stop // RESAMPLE_BLOCK)):
        first = block * RESAMPLE_BLOCK
        rows = min(RESAMPLE_BLOCK, num_resamples - first)
        counts = _resample_block(np.random.default_rng(seeds[block]), rows, members, num_items)
        parts.append(counts[max(start - first, 0):stop - first])
    return np.concatenate(parts) if parts else np.zeros((0, num_items), np.int32)


@jax.jit
def _binary_totals(counts: jax.Array, bits: jax.Array) -> jax.Array:
    # Integer counts times 0/1 outcomes: every partial sum is an integer below
    # 2^24, so the float32 product is exact.
    return jnp.matmul(counts.astype(jnp.float32), bits.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class Resamples:
    """Bootstrap totals of S rows over the same resamples of N items.

    Attributes:
      estimate: float64 [S], totals on the data itself.
      samples: float64 [R, S], totals in each resample.
      num_items: N.
      level: interval coverage, e.g. 0.95.
      seed: seed of the resamples.
    """

    estimate: np.ndarray
    samples: np.ndarray
    num_items: int
    level: float
    seed: int

    @property
    def num_resamples(self) -> int:
        return self.samples.shape[0]

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the percentile interval (low [S], high [S]) of each row's total."""
        return _percentile_interval(self.samples, self.level)

    def difference(self, rows: Any, reference: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the paired difference total[rows] − total[reference]: estimate, low, high (each [len(rows)])."""
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        samples = self.samples[:, rows] - self.samples[:, [reference]]
        low, high = _percentile_interval(samples, self.level)
        return self.estimate[rows] - self.estimate[reference], low, high


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    return low, high


def resample_totals(values: Any, *, num_resamples: int, level: float = 0.95, seed: int = 0,
                    strata: Any = None, memory_budget_gb: float = 0.25) -> Resamples:
    """Bootstrap the per-row totals of per-item values [S, N].

    0/1 values (recall outcomes) are multiplied by the count matrix in one
    float32 JAX matrix product per block of resamples, which is exact; any
    other values in float64 on the host.

    Args:
      values: [S, N] or [N] per-item outcomes, e.g. 0/1 recall or 2AFC scores.
      num_resamples: R >= 1.
      level: interval coverage in (0, 1).
      seed: seed of the resamples; the same seed and N give the same resamples
        for every call, so separate calls stay paired.
      strata: optional labels [N]; items are resampled within each stratum.
      memory_budget_gb: bound on the count matrix held at once.

    Returns:
      Resamples.
    """
    values = np.atleast_2d(np.asarray(values))
    check_level(level)
    if num_resamples < 1:
        raise ValueError(f"the number of bootstrap resamples must be >= 1, got {num_resamples}.")
    num_rows, num_items = values.shape
    if num_items == 0:
        raise ValueError("cannot bootstrap zero items.")
    binary = values.dtype == bool or bool(np.isin(values, (0, 1)).all())
    if binary and num_items >= FLOAT32_EXACT_INTEGER:
        binary = False
    rows_per_call = max(RESAMPLE_BLOCK, int(memory_budget_gb * 2 ** 30 // (4 * num_items))
                        // RESAMPLE_BLOCK * RESAMPLE_BLOCK)
    device_bits = jnp.asarray(values.T.astype(np.float32)) if binary else None
    host_values = None if binary else values.T.astype(np.float64)
    samples = np.empty((num_resamples, num_rows))
    for start in range(0, num_resamples, rows_per_call):
        stop = min(start + rows_per_call, num_resamples)
        counts = resample_counts(num_items, num_resamples, seed=seed, strata=strata, start=start, stop=stop)
        if binary:
            samples[start:stop] = np.asarray(jax.device_get(_binary_totals(jnp.asarray(counts), device_bits)))
        else:
            samples[start:stop] = counts @ host_values
    if binary:
        samples = np.rint(samples)
    estimate = values.astype(np.float64).sum(axis=1)
    return Resamples(estimate=estimate, samples=samples, num_items=num_items, level=level, seed=seed)


def resample_totals_reference(values: Any, *, num_resamples: int, seed: int = 0, strata: Any = None
                              ) -> np.ndarray:
    """Loop version of `resample_totals(...).samples`: float64 [R, S], one resample at a time."""
    values = np.atleast_2d(np.asarray(values, np.float64))
    out = np.empty((num_resamples, values.shape[0]))
    for r in range(num_resamples):
        counts = resample_counts(values.shape[1], num_resamples, seed=seed, strata=strata, start=r, stop=r + 1)[0]
        for s in range(values.shape[0]):
            out[r, s] = sum(float(c) * float(v) for c, v in zip(counts, values[s]) if c)
    return out


# ----------------------------------------------------------------------------
# Paired tests.


def discordant_counts(values: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """Count the items where each row beats the reference and where it loses.

    Args:
      values: [S, N] or [N] per-item outcomes.
      reference: [N] outcomes of the reference on the same items.

    Returns:
      wins int64 [S] (value > reference), losses int64 [S] (value < reference).
    """
    values = np.atleast_2d(np.asarray(values, np.float64))
    reference = np.asarray(reference, np.float64)
    if reference.shape != (values.shape[1],):
        raise ValueError(f"reference must be [N] with N = {values.shape[1]}; got shape {reference.shape}.")
    return (values > reference).sum(axis=1).astype(np.int64), (values < reference).sum(axis=1).astype(np.int64)


def sign_test(wins: Any, losses: Any) -> np.ndarray:
    """Exact two-sided binomial test of wins against losses at probability 1/2.

    On 0/1 outcomes the discordant items are exactly McNemar's b and c, so
    this is the exact McNemar test: p = min(1, 2 P[X <= min(b, c)]) with
    X ~ Binomial(b + c, 1/2), and p = 1 when b + c = 0.

    Returns:
      float64 p-values with the broadcast shape of the inputs.
    """
    wins = np.asarray(wins, np.int64)
    losses = np.asarray(losses, np.int64)
    if np.any(wins < 0) or np.any(losses < 0):
        raise ValueError(f"discordant counts must be non-negative, got {wins} and {losses}.")
    total = wins + losses
    smaller = np.minimum(wins, losses)
    tail = scipy.stats.binom.cdf(smaller, np.maximum(total, 1), 0.5)
    return np.where(total == 0, 1.0, np.minimum(1.0, 2.0 * tail))


def holm_adjust(p_values: Any) -> np.ndarray:
    """Return Holm's step-down adjusted p-values (family-wise error control) for [S] p-values."""
    p_values = np.asarray(p_values, np.float64)
    count = p_values.size
    order = np.argsort(p_values, kind="stable")
    adjusted = np.maximum.accumulate((count - np.arange(count)) * p_values[order])
    out = np.empty_like(p_values)
    out[order] = np.minimum(adjusted, 1.0)
    return out
