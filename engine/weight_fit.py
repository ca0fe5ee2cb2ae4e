"""Continuous non-negative weights per representation, fitted to retrieve the true match.

Beyond the 2^M − 1 subsets (weights 0 or 1), any non-negative weighting
Φ_w = Σ_k w_k Φ_k is a candidate. This module fits w on training queries by
minimising a smooth surrogate of recall@1, then scores the fitted w exactly
on held-out queries with `engine.retrieval.search`.

Surrogate. For query i with standardised margins
x_k(i, j) = (Φ_k(i, j) − Φ_k(i, i)) / σ_k, the loss is the softmax
cross-entropy of the true match against the gallery,
log(1 + Σ_{j≠i} exp(Σ_k u_k x_k(i, j))), with u = softplus(θ) >= 0 the
weights of the standardised similarities. The overall scale of u acts as an
inverse temperature and is fitted too; only the direction of u affects
ranks. The raw weights are w_k = u_k / σ_k.

Memory. One blocked pass over the similarity rows (`SimilaritySource.block`)
keeps, per query, the margins of its hard negatives (the top
`hard_per_member` items of every member, duplicates removed) and of
`tail_samples` gallery items drawn uniformly at random. The sum over the
rest of the gallery is estimated from the random draws, each weighted by
G / tail_samples (an unbiased estimate of the sum over the items outside the
hard set). Every optimiser step then reads a minibatch of `batch_size`
training queries, so a step costs [B, M, W] with W = M · hard_per_member +
tail_samples, whatever the gallery size.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from engine import retrieval, similarity

__all__ = [
    "FitCache",
    "FitOptions",
    "HeldOutWeights",
    "build_fit_cache",
    "cross_validate_weights",
    "fit_weights",
    "held_out_ranks",
    "surrogate_loss",
]

FITTED = "fitted"
STANDARDIZED_EQUAL = "standardized_equal"


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Settings of the weight fit.

    Attributes:
      hard_per_member: top items per representation kept as hard negatives.
      tail_samples: gallery items drawn at random per query for the rest.
      steps: Adam steps per fit.
      batch_size: training queries per step.
      learning_rate: peak Adam step size on θ (cosine decay to 5% of it).
      seed: seed of the random draws and minibatches.
    """

    hard_per_member: int = 32
    tail_samples: int = 64
    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 0.05
    seed: int = 0

    def __post_init__(self):
        for name in ("hard_per_member", "tail_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitOptions.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"FitOptions.learning_rate must be > 0, got {self.learning_rate}.")


@dataclasses.dataclass(frozen=True)
class FitCache:
    """Per-query standardised margins of hard negatives and random gallery draws.

    Attributes:
      margins: float32 [N, M, W], x_k(i, j) for the kept items j of query i.
      log_weights: float32 [N, W]: 0 for a hard negative, log(G / tail_samples)
        for a random draw, −inf for a slot that does not count (a repeated
        hard negative, or a draw that hit the match or the hard set).
      std: float64 [M], σ_k used to standardise.
    """

    margins: np.ndarray
    log_weights: np.ndarray
    std: np.ndarray


@partial(jax.jit, static_argnames=("hard", "tail"))
def _cache_block(phi: jax.Array, rows: jax.Array, key: jax.Array, inverse_std: jax.Array, *, hard: int, tail: int):
    """Reduce similarity rows [M, B, G] of queries `rows` to margins [B, M, W] and log-weights [B, W]."""
    num_members, block, gallery = phi.shape
    is_self = jnp.arange(gallery)[None, :] == rows[:, None]
    diagonal = jnp.sum(jnp.where(is_self[None], phi, 0.0), axis=2)
    masked = jnp.where(is_self[None], -jnp.inf, phi)

    _, top = jax.lax.top_k(masked, hard)                                   # [M, B, H]
    hard_items = jnp.sort(jnp.transpose(top, (1, 0, 2)).reshape(block, num_members * hard), axis=1)
    repeated = jnp.concatenate([jnp.zeros((block, 1), bool), hard_items[:, 1:] == hard_items[:, :-1]], axis=1)

    draws = jax.random.randint(key, (block, tail), 0, gallery)
    position = jax.vmap(jnp.searchsorted)(hard_items, draws)
    in_hard = jnp.take_along_axis(hard_items, jnp.minimum(position, hard_items.shape[1] - 1), axis=1) == draws
    excluded = in_hard | (draws == rows[:, None])

    items = jnp.concatenate([hard_items, draws], axis=1)                  # [B, W]
    values = jnp.take_along_axis(phi, jnp.broadcast_to(items[None], (num_members,) + items.shape), axis=2)
    margins = (values - diagonal[:, :, None]) * inverse_std[:, None, None]
    log_weights = jnp.concatenate([
        jnp.where(repeated, -jnp.inf, 0.0),
        jnp.where(excluded, -jnp.inf, jnp.log(gallery / tail)),
    ], axis=1)
    return jnp.transpose(margins, (1, 0, 2)), log_weights


def build_fit_cache(source: similarity.SimilaritySource, std: np.ndarray, *, options: FitOptions = FitOptions(),
                    memory_budget_gb: float = 4.0, progress: bool = True) -> FitCache:
    """Compute the margins the surrogate needs for every query, in one blocked pass.

    Every query's row is reduced on its own, so a fit that reads only the
    training rows of the cache uses no information from a held-out query.

    Args:
      source: similarity rows of the M representations.
      std: float64 [M] population standard deviations of the Φ_k
        (`SearchResult.std`); a zero deviation gets weight 0 in the margins.
      options: the fit settings (hard_per_member, tail_samples, seed).
      memory_budget_gb: bound on the cache plus one similarity block.
      progress: show a progress bar.
    """
    n, m, g = source.num_queries, source.num_members, source.num_gallery
    if g < 2:
        raise ValueError(f"weight fitting needs a gallery of at least 2 items, got G = {g}.")
    hard = min(options.hard_per_member, g - 1)
    width = m * hard + options.tail_samples
    cache_bytes = n * width * (4 * m + 4)
    budget = int(memory_budget_gb * 2 ** 30)
    if cache_bytes > budget // 2:
        raise MemoryError(f"the weight-fit cache needs {cache_bytes / 2**30:.2f} GB for N = {n} queries and "
                          f"W = {width} items per query, over half the memory budget of {memory_budget_gb} GB. "
                          "Raise --memory_budget_gb or lower --fit_hard_per_member / --fit_tail_samples.")
    inverse_std = jnp.asarray(similarity.standardization_weights(std, source.names), jnp.float32)
    block = max(1, min(256, n, (budget // 2) // max(1, 3 * source.bytes_per_query_row())))
    margins = np.empty((n, m, width), np.float32)
    log_weights = np.empty((n, width), np.float32)
    key = jax.random.PRNGKey(options.seed)
    for start in tqdm(range(0, n, block), desc="weight-fit cache", unit="block", disable=not progress):
        stop = min(start + block, n)
        phi = source.block(start, stop)
        if stop - start < block:
            phi = jnp.pad(phi, ((0, 0), (0, block - (stop - start)), (0, 0)))
        rows = jnp.arange(start, start + block)
        out = jax.device_get(_cache_block(phi, rows, jax.random.fold_in(key, start), inverse_std,
                                          hard=hard, tail=options.tail_samples))
        margins[start:stop], log_weights[start:stop] = out[0][:stop - start], out[1][:stop - start]
    return FitCache(margins=margins, log_weights=log_weights, std=np.asarray(std, np.float64))


def _loss(theta: jax.Array, margins: jax.Array, log_weights: jax.Array) -> jax.Array:
    weights = jax.nn.softplus(theta)
    logits = jnp.einsum("bmw,m->bw", margins, weights) + log_weights
    # log(1 + Σ exp(logits)): the true match has margin 0 and logit 0.
    with_match = jnp.concatenate([jnp.zeros((logits.shape[0], 1), logits.dtype), logits], axis=1)
    return jnp.mean(jax.nn.logsumexp(with_match, axis=1))


def surrogate_loss(cache: FitCache, rows: np.ndarray, standardized_weights: np.ndarray) -> float:
    """Return the mean surrogate loss of the given queries under standardised weights u [M] (u > 0)."""
    u = np.asarray(standardized_weights, np.float64)
    theta = jnp.asarray(u + np.log(-np.expm1(-u)), jnp.float32)  # the inverse of softplus
    rows = np.asarray(rows)
    return float(_loss(theta, jnp.asarray(cache.margins[rows]), jnp.asarray(cache.log_weights[rows])))


@jax.jit
def _adam(theta: jax.Array, margins: jax.Array, log_weights: jax.Array, batches: jax.Array,
          step_sizes: jax.Array) -> jax.Array:
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    grad = jax.grad(_loss)

    def step(carry, inputs):
        theta, first, second, count = carry
        batch, step_size = inputs
        gradient = grad(theta, margins[batch], log_weights[batch])
        count = count + 1.0
        first = beta1 * first + (1.0 - beta1) * gradient
        second = beta2 * second + (1.0 - beta2) * gradient * gradient
        update = (first / (1.0 - beta1 ** count)) / (jnp.sqrt(second / (1.0 - beta2 ** count)) + eps)
        return (theta - step_size * update, first, second, count), None

    zeros = jnp.zeros_like(theta)
    (theta, _, _, _), _ = jax.lax.scan(step, (theta, zeros, zeros, jnp.float32(0.0)), (batches, step_sizes))
    return theta


def _minibatches(rows: np.ndarray, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Return int32 [steps, B]: consecutive slices of repeated shuffles of `rows`."""
    batch_size = min(batch_size, rows.size)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(rows) for _ in range(-(-needed // rows.size))])
    return order[:needed].reshape(steps, batch_size).astype(np.int32)


def fit_weights(cache: FitCache, rows: np.ndarray, *, options: FitOptions = FitOptions(), fold: int = 0
                ) -> np.ndarray:
    """Fit non-negative weights of the standardised similarities on the given training queries.

    Adam on θ (u = softplus(θ)) from equal standardised weights u = 1,
    minibatches drawn from `rows` only. Deterministic for fixed options,
    rows and `fold` (which offsets the seed, so folds draw differently).

    Args:
      cache: the output of `build_fit_cache`.
      rows: int [n] training query indices.
      options: steps, batch size, learning rate, seed.
      fold: index mixed into the seed.

    Returns:
      float64 [M], the fitted u, scaled to sum to 1.
    """
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        raise ValueError("weight fitting needs at least one training query.")
    rng = np.random.default_rng([options.seed, fold])
    batches = _minibatches(rows, options.steps, options.batch_size, rng)
    progress = np.arange(options.steps) / max(1, options.steps - 1)
    step_sizes = options.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * progress)))
    start = jnp.full(cache.margins.shape[1], math.log(math.e - 1.0), jnp.float32)  # softplus = 1
    theta = _adam(start, jnp.asarray(cache.margins), jnp.asarray(cache.log_weights), jnp.asarray(batches),
                  jnp.asarray(step_sizes, jnp.float32))
    weights = np.asarray(jax.nn.softplus(theta), np.float64)
    return weights / weights.sum()


def raw_weights(standardized: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Convert weights of standardised similarities to weights of the raw Φ_k (w = u / σ), max 1."""
    inverse = np.divide(1.0, std, out=np.zeros_like(std, dtype=np.float64), where=np.asarray(std) > 0)
    raw = np.asarray(standardized, np.float64) * inverse
    return raw / raw.max()


def held_out_ranks(source: similarity.SimilaritySource, queries: np.ndarray,
                   weights: dict[str, np.ndarray], *, ks: Sequence[int], memory_budget_gb: float = 4.0
                   ) -> dict[str, tuple[np.ndarray, int]]:
    """Score weightings on some queries with the exact engine.

    Args:
      source: the full source.
      queries: int [N'] query indices to score.
      weights: mode name -> raw weights [M] (non-negative, not all zero).
      ks: K values (the ranks are capped at max(ks)).
      memory_budget_gb: the engine's memory bound.

    Returns:
      mode -> (min(rank, K_max) int64 [N'] in the order of `queries`, near-tie count).
    """
    restricted = source.select_queries(queries)
    full = (1 << source.num_members) - 1
    result = retrieval.search(restricted, ks=ks, modes=tuple(weights), weights=weights, masks=np.array([full]),
                              memory_budget_gb=memory_budget_gb, progress=False)
    row = result.row_of(full)
    return {mode: (result.modes[mode].ranks[row].astype(np.int64), int(result.modes[mode].near_ties[row]))
            for mode in weights}


@dataclasses.dataclass(frozen=True)
class HeldOutWeights:
    """Weights fitted on the training folds and scored on the held-out fold.

    Attributes:
      standardized: float64 [F, M], fitted u per fold (sum 1).
      raw: float64 [F, M], the same as weights of the raw Φ_k (max 1).
      ranks: mode -> int64 [N], min(rank, K_max) of every query under the
        weighting fitted without its fold ("fitted"), and any comparison
        weighting scored the same way.
      near_ties: mode -> near-tie decisions over all folds.
      seconds: wall time of the cache, the fits and the held-out scoring.
    """

    standardized: np.ndarray
    raw: np.ndarray
    ranks: dict[str, np.ndarray]
    near_ties: dict[str, int]
    seconds: dict[str, float]


def cross_validate_weights(source: similarity.SimilaritySource, folds: np.ndarray, std: np.ndarray, *,
                           ks: Sequence[int], options: FitOptions = FitOptions(),
                           compare_standardized: bool = False, memory_budget_gb: float = 4.0,
                           progress: bool = True) -> HeldOutWeights:
    """Fit weights on each fold's training queries and score them on its held-out queries.

    Args:
      source: similarity rows.
      folds: int [N], fold of every query (the same folds as the subset
        cross-validation, so the comparison is paired).
      std: float64 [M] population standard deviations (`SearchResult.std`).
      ks: K values.
      options: the fit settings.
      compare_standardized: also score equal standardised weights (1 / σ_k)
        on every fold, under the mode name "standardized_equal". A search that
        already has the all-member standardised subset does not need it.
      memory_budget_gb: memory bound of the cache and of the engine.
      progress: show progress.
    """
    folds = np.asarray(folds, np.int64)
    num_folds = int(folds.max()) + 1
    seconds = {}
    start = time.perf_counter()
    cache = build_fit_cache(source, std, options=options, memory_budget_gb=memory_budget_gb, progress=progress)
    seconds["cache"] = time.perf_counter() - start

    m = source.num_members
    standardized = np.empty((num_folds, m))
    ranks: dict[str, np.ndarray] = {}
    near_ties: dict[str, int] = {}
    seconds["fit"] = seconds["held_out_search"] = 0.0
    for fold in range(num_folds):
        start = time.perf_counter()
        standardized[fold] = fit_weights(cache, np.flatnonzero(folds != fold), options=options, fold=fold)
        seconds["fit"] += time.perf_counter() - start
        logging.info("fold %d: fitted standardised weights %s", fold,
                     ", ".join(f"{name} {w:.3f}" for name, w in zip(source.names, standardized[fold])))

        start = time.perf_counter()
        held = np.flatnonzero(folds == fold)
        weightings = {FITTED: raw_weights(standardized[fold], std)}
        if compare_standardized:
            weightings[STANDARDIZED_EQUAL] = raw_weights(np.ones(m), std)
        for mode, (mode_ranks, near) in held_out_ranks(source, held, weightings, ks=ks,
                                                       memory_budget_gb=memory_budget_gb).items():
            ranks.setdefault(mode, np.empty(source.num_queries, np.int64))[held] = mode_ranks
            near_ties[mode] = near_ties.get(mode, 0) + near
        seconds["held_out_search"] += time.perf_counter() - start
    raw = np.stack([raw_weights(u, std) for u in standardized])
    return HeldOutWeights(standardized=standardized, raw=raw, ranks=ranks, near_ties=near_ties, seconds=seconds)
