"""Recall@K of every subset of M representations, in batched bitmask form.

Semantics. For a subset S (bit k of the mask is representation k) with
non-negative weights w, the score of gallery item j for query i is
Φ_S(i, j) = Σ_{k∈S} w_k Φ_k(i, j). The rank of query i is the number of
items j ≠ i with Φ_S(i, j) ≥ Φ_S(i, i): ties count against the query, so a
constant score recalls nothing. Query i is recalled at K when its rank < K.
Raw mode uses w = 1, standardised mode w_k = 1 / σ_k with σ_k the population
standard deviation of Φ_k over all N × G entries (the mean shift cannot change
a rank), and the Python API takes any non-negative weights.

Algorithm (exact for the capped rank min(rank, K_max)).

1. One pass over blocks of query rows computes every Φ_k block from the
   features, the moments for standardisation, and per query a candidate set:
   the items that reach, in at least one member k, a threshold θ_k(i) set
   near the L-th largest value of Φ_k(i, ·). Every other item scores below
   θ_k(i) in every member, so its combined score is at most
   Σ_{k∈S} w_k θ_k(i) for every subset.
2. Per mode, candidate scores are quantised to int32 fixed point
   (round(scale · w_k · Φ_k)), which makes every summation order exact, and
   one jitted kernel builds all 2^M subset sums of a block of queries from
   two half-subset tables (2^⌈M/2⌉ and 2^⌊M/2⌋ sums per candidate) and counts,
   for every subset at once, the candidates that outrank the true match.
3. A (query, subset) pair is decided when at least K_max candidates
   outrank the match beyond rounding doubt (it fails every K), or when the
   bound says no non-candidate can reach the match. The rare undecided pairs
   are recomputed over the whole gallery with the same kernel.

Near-ties. A decision is flagged as a near-tie when moving every score that
lies within the float32 error bound of the match's score could change
whether rank < K for some requested K. Off those, the result equals the
float64 brute-force reference in `engine.reference`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from engine import similarity, subsets

RAW = "raw"
STANDARDIZED = "standardized"
BUILTIN_MODES = (RAW, STANDARDIZED)

INT32_MAX = 2 ** 31 - 1
# NOTE: an estimated bound on the relative error of σ_k: row moments are
# float32 tree reductions over G terms (about log2(G) roundoffs) combined in
# float64; 2^-19 leaves a margin of about 16x at G = 10^4.
STD_RELATIVE_ERROR = 2.0 ** -19


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Mode-independent per-query data from the similarity pass.

    Attributes:
      values: float32 [N, M, C], Φ_k(i, j) for the candidate items j of query i.
      valid: bool [N, C]; False marks padding and repeated items.
      diagonal: float32 [N, M], Φ_k(i, i).
      upper: float32 [N, M], bound on Φ_k(i, j) for every non-candidate j
        (−inf when the candidates are the whole gallery, +inf when the query
        had more candidates than fit, so that no bound holds).
      mean, std: float64 [M], population moments of each Φ_k.
    """

    values: np.ndarray
    valid: np.ndarray
    diagonal: np.ndarray
    upper: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@dataclasses.dataclass
class ModeResult:
    """Results of one mode for the searched masks.

    Attributes:
      name: mode name.
      weights: float64 [M] weights used.
      recall: int64 [S, len(ks)], queries recalled at each K.
      ranks: uint8 or uint16 [S, N], min(rank, K_max) per query.
      near_ties: int64 [S], queries whose decision is within float32 rounding.
      near_tie_pairs: int64 [P, 2], the (subset row, query) of every near-tie.
      undecided_pairs: (query, subset) pairs recomputed over the whole gallery.
      seconds: wall time of this mode's evaluation.
    """

    name: str
    weights: np.ndarray
    recall: np.ndarray
    ranks: np.ndarray
    near_ties: np.ndarray
    near_tie_pairs: np.ndarray
    undecided_pairs: int
    seconds: float


@dataclasses.dataclass
class SearchResult:
    """Everything a subset search produced.

    Attributes:
      names: M representation names in run order.
      num_queries, num_gallery: N and G.
      ks: the requested K values, ascending.
      masks: int64 [S], the searched subsets.
      modes: results per mode name, in run order.
      mean, std: float64 [M] population moments of each Φ_k.
      timings: seconds per stage.
      candidates_per_member: L used for pruning.
    """

    names: tuple[str, ...]
    num_queries: int
    num_gallery: int
    ks: tuple[int, ...]
    masks: np.ndarray
    modes: dict[str, ModeResult]
    mean: np.ndarray
    std: np.ndarray
    timings: dict[str, float]
    candidates_per_member: int

    def sizes(self) -> np.ndarray:
        return subsets.popcount(self.masks)

    def row_of(self, mask: int) -> int:
        """Return the row of `mask` in the per-subset arrays."""
        row = int(np.searchsorted(self.masks, mask))
        if row >= len(self.masks) or self.masks[row] != mask:
            raise KeyError(f"subset mask {mask} was not searched.")
        return row


def validate_ks(ks: Sequence[int], num_gallery: int) -> tuple[int, ...]:
    """Return sorted unique K values, rejecting K < 1 or K > G."""
    if not ks:
        raise ValueError("ks is empty; request at least one K, e.g. --ks=1,5,10.")
    values = sorted({int(k) for k in ks})
    if values[0] < 1:
        raise ValueError(f"every K must be >= 1, got {values[0]}.")
    if values[-1] > num_gallery:
        raise ValueError(
            f"K = {values[-1]} is larger than the gallery (G = {num_gallery}); "
            f"recall@K would count every query. Use K <= {num_gallery}.")
    if values[-1] > np.iinfo(np.uint16).max:
        raise ValueError(f"K = {values[-1]} is above the supported maximum {np.iinfo(np.uint16).max}.")
    return tuple(values)


def resolve_mode_weights(
    modes: Sequence[str],
    names: Sequence[str],
    std: np.ndarray,
    custom: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """Return the weight vector [M] of every requested mode.

    Args:
      modes: mode names; "raw" and "standardized" are built in, any other name
        must be a key of `custom`.
      names: representation names, for messages.
      std: population standard deviations [M] (for "standardized").
      custom: user weightings by mode name; non-negative, finite, length M.
    """
    custom = dict(custom or {})
    resolved = {}
    for mode in modes:
        if mode in custom:
            weights = np.asarray(custom[mode], dtype=np.float64)
            if weights.shape != (len(names),):
                raise ValueError(f"weights for mode {mode!r} have shape {weights.shape}; expected ({len(names)},) "
                                 f"for representations {list(names)}.")
            if not np.all(np.isfinite(weights)) or np.any(weights < 0):
                raise ValueError(f"weights for mode {mode!r} must be finite and non-negative, got {weights}.")
            if not np.any(weights > 0):
                raise ValueError(f"weights for mode {mode!r} are all zero.")
            resolved[mode] = weights
        elif mode == RAW:
            resolved[mode] = np.ones(len(names))
        elif mode == STANDARDIZED:
            resolved[mode] = similarity.standardization_weights(std, names)
        else:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {list(BUILTIN_MODES) + sorted(custom)}.")
    return resolved


def search(
    source: similarity.SimilaritySource,
    *,
    ks: Sequence[int] = (1, 5, 10),
    modes: Sequence[str] = BUILTIN_MODES,
    weights: Mapping[str, Sequence[float]] | None = None,
    masks: np.ndarray | None = None,
    max_subset_size: int | None = None,
    memory_budget_gb: float = 4.0,
    candidates_per_member: int | None = None,
    progress: bool = True,
) -> SearchResult:
    """Compute recall@K of every requested subset in every mode.

    Args:
      source: similarity rows of the M representations (see engine.similarity).
      ks: the K values of recall@K.
      modes: "raw", "standardized" and/or names of `weights` entries.
      weights: custom non-negative weightings [M] by mode name.
      masks: subsets to report (int bitmasks); default all 2^M − 1.
      max_subset_size: report only subsets with at most this many members.
      memory_budget_gb: bound on the working memory of the search, in GB.
      candidates_per_member: L, top items per representation kept per query
        (default max(128, 4 K_max)); changes speed, never results. Larger L
        costs more per query but leaves fewer (query, subset) pairs for the
        whole-gallery recomputation.
      progress: log progress with rate and time left.

    Returns:
      A SearchResult.
    """
    num_members = source.num_members
    ks = validate_ks(ks, source.num_gallery)
    if not modes:
        raise ValueError("no mode requested; use raw and/or standardized.")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes repeat in {list(modes)}.")
    all_subset_masks = subsets.all_masks(num_members)
    if masks is None:
        masks = subsets.all_masks(num_members, max_size=max_subset_size)
    else:
        masks = np.unique(np.asarray(masks, dtype=np.int64))
        if masks.size == 0 or masks[0] < 1 or masks[-1] > all_subset_masks[-1]:
            raise ValueError(f"subset masks must lie in [1, {all_subset_masks[-1]}], got {masks[:5]}...")
        if max_subset_size is not None:
            masks = masks[subsets.popcount(masks) <= max_subset_size]
    if masks.size == 0:
        raise ValueError("no subset left to search; check max_subset_size and the subset list.")
    # Single representations are always searched: the exclusive-retrieval and
    # oracle analyses need their per-query outcomes, and they cost nothing extra.
    masks = np.union1d(masks, 1 << np.arange(num_members, dtype=np.int64))

    budget = int(memory_budget_gb * 2 ** 30)
    k_max = ks[-1]
    per_member = candidates_per_member or max(128, 4 * k_max)
    per_member = max(1, min(per_member, source.num_gallery - 1)) if source.num_gallery > 1 else 0
    _check_budget(source, len(modes), masks.size, per_member, k_max, budget)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    candidates = collect_candidates(source, per_member, budget=budget, progress=progress)
    timings["similarity_and_candidates"] = time.perf_counter() - start

    mode_weights = resolve_mode_weights(modes, source.names, candidates.std, weights)
    results = {}
    for mode, mode_weight in mode_weights.items():
        start = time.perf_counter()
        results[mode] = _evaluate_mode(
            source, candidates, mode, mode_weight, ks, masks, budget=budget, progress=progress)
        timings[f"mode_{mode}"] = time.perf_counter() - start
    return SearchResult(
        names=source.names,
        num_queries=source.num_queries,
        num_gallery=source.num_gallery,
        ks=ks,
        masks=masks,
        modes=results,
        mean=candidates.mean,
        std=candidates.std,
        timings=timings,
        candidates_per_member=per_member,
    )


def _check_budget(source, num_modes, num_masks, per_member, k_max, budget) -> None:
    num_candidates = per_member * source.num_members
    candidate_bytes = source.num_queries * (source.num_members * (num_candidates + 2) * 4 + num_candidates)
    rank_bytes = num_modes * num_masks * source.num_queries * (1 if k_max < 256 else 2)
    fixed = source.resident_bytes() + candidate_bytes + rank_bytes
    if fixed > budget:
        raise MemoryError(
            f"the search needs about {fixed / 2**30:.2f} GB (features {source.resident_bytes() / 2**30:.2f}, "
            f"candidates {candidate_bytes / 2**30:.2f}, per-query ranks {rank_bytes / 2**30:.2f}) but "
            f"the memory budget is {budget / 2**30:.2f} GB. Raise --memory_budget_gb, search fewer "
            "subsets (--max_subset_size) or fewer representations.")


def _block_rows(bytes_per_row: int, budget: int, *, maximum: int, fraction: float = 0.25) -> int:
    rows = int(budget * fraction // max(bytes_per_row, 1))
    return max(1, min(maximum, rows))


# ----------------------------------------------------------------------------
# Pass 1: similarity blocks -> candidates and moments.


@partial(jax.jit, static_argnames=("stride", "sample_rank", "capacity", "complete"))
def _candidate_block(phi: jax.Array, row_start: jax.Array, *, stride: int, sample_rank: int,
                     capacity: int, complete: bool):
    """Reduce similarity rows [M, B, G] of queries row_start.. to their candidates.

    A member's threshold θ_k(i) is the `sample_rank`-th largest value of
    every `stride`-th gallery item (the true match excluded), so about
    stride * sample_rank items reach it. Candidates are the items that reach
    the threshold in at least one member; every other item is below θ_k(i)
    in every member k, which makes θ the bound on non-candidates. With
    `complete`, every item but the match is a candidate and θ = −inf.

    Returns values [B, M, capacity], valid [B, capacity], diagonal [B, M],
    thresholds [B, M], overflow [B] (more candidates than capacity, so the
    bound does not hold), and row moments [M, B] (mean, squared deviations).
    """
    num_members, block, gallery = phi.shape
    rows = row_start + jnp.arange(block)
    is_diagonal = jnp.arange(gallery)[None, :] == rows[:, None]
    diagonal = jnp.sum(jnp.where(is_diagonal[None], phi, 0.0), axis=2)
    masked = jnp.where(is_diagonal[None], -jnp.inf, phi)
    if complete:
        threshold = jnp.full((num_members, block), -jnp.inf, phi.dtype)
        union = ~is_diagonal
    else:
        # Only the values of top_k are used and they are reduced with min:
        # slicing a top_k output makes XLA:CPU (jax 0.10) fall back to a
        # full sort, about 20x slower.
        sample_values, _ = jax.lax.top_k(masked[:, :, ::stride], sample_rank)
        threshold = jnp.min(sample_values, axis=-1)
        union = jnp.any(masked >= threshold[..., None], axis=0)
    count = union.sum(axis=1)
    index = jax.vmap(lambda row: jnp.nonzero(row, size=capacity, fill_value=0)[0])(union)
    valid = jnp.arange(capacity)[None, :] < count[:, None]
    values = jnp.take_along_axis(phi, jnp.broadcast_to(index[None], (num_members,) + index.shape), axis=2)
    mean, squared_deviations = similarity.row_moments(phi)
    return (jnp.transpose(values, (1, 0, 2)), valid, diagonal.T, threshold.T, count > capacity,
            mean, squared_deviations)


def candidate_layout(num_members: int, num_gallery: int, per_member: int) -> dict[str, int | bool]:
    """Static settings of pass 1 for L = `per_member` expected top items per member."""
    if num_gallery - 1 <= num_members * per_member:
        return {"stride": 1, "sample_rank": 1, "capacity": max(1, num_gallery - 1), "complete": True}
    stride = max(1, min(8, num_gallery // (4 * per_member)))
    sample_rank = max(1, per_member // stride)
    capacity = min(num_gallery - 1, -(-int(1.25 * num_members * per_member) // 128) * 128)
    return {"stride": stride, "sample_rank": sample_rank, "capacity": capacity, "complete": False}


def collect_candidates(
    source: similarity.SimilaritySource,
    per_member: int,
    *,
    budget: int,
    progress: bool = True,
) -> Candidates:
    """Run pass 1 over all query rows (see the module docstring)."""
    n, m, g = source.num_queries, source.num_members, source.num_gallery
    layout = candidate_layout(m, g, per_member)
    capacity = layout["capacity"]
    # Φ block, its masked copy and comparison masks: about 3 copies of [M, B, G].
    block = min(_block_rows(3 * source.bytes_per_query_row(), budget, maximum=256), n)
    values = np.empty((n, m, capacity), np.float32)
    valid = np.empty((n, capacity), bool)
    diagonal = np.empty((n, m), np.float32)
    upper = np.empty((n, m), np.float32)
    overflow = np.empty(n, bool)
    row_mean = np.empty((m, n), np.float32)
    row_m2 = np.empty((m, n), np.float32)
    reporter = _Progress("similarity pass", n, enabled=progress)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = stop - start
        phi = source.block(start, stop)
        if rows < block:
            phi = jnp.pad(phi, ((0, 0), (0, block - rows), (0, 0)))
        out = jax.device_get(_candidate_block(phi, jnp.int32(start), **layout))
        values[start:stop], valid[start:stop] = out[0][:rows], out[1][:rows]
        diagonal[start:stop], upper[start:stop] = out[2][:rows], out[3][:rows]
        overflow[start:stop] = out[4][:rows]
        row_mean[:, start:stop], row_m2[:, start:stop] = out[5][:, :rows], out[6][:, :rows]
        reporter.update(rows)
    # A query with more candidates than capacity has no valid bound.
    upper[overflow] = np.inf
    # Candidates are packed first, so trailing slots that no query uses can go.
    used = int(valid.sum(axis=1).max()) if n else 0
    width = min(capacity, max(1, -(-used // 32) * 32))
    mean, std = similarity.combine_row_moments(row_mean, row_m2, g)
    return Candidates(values=np.ascontiguousarray(values[:, :, :width]),
                      valid=np.ascontiguousarray(valid[:, :width]),
                      diagonal=diagonal, upper=upper, mean=mean, std=std)


# ----------------------------------------------------------------------------
# Pass 2: fixed-point subset counts.


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Quantisation of one mode: q = round(scale · w_k · Φ_k) in int32.

    `scale` is chosen so that any subset sum of differences fits in int32;
    `tolerance` [M] is, per member, the integer error bound of a difference
    (float32 error of Φ, error of the standardisation weight, rounding).
    """

    scale: float
    weights: np.ndarray
    tolerance: np.ndarray

    @classmethod
    def for_mode(cls, weights: np.ndarray, source: similarity.SimilaritySource, *, weight_error: float
                 ) -> "FixedPoint":
        total = float(np.sum(weights * source.value_bounds))
        scale = INT32_MAX / (2.0 * total * (1.0 + 1e-6) + 4.0 * len(weights))
        error = source.error_bounds + weight_error * source.value_bounds
        tolerance = np.ceil(2.0 * scale * weights * error).astype(np.int64) + 2
        return cls(scale=scale, weights=weights, tolerance=tolerance)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Quantise float values [..., M] (member axis last) to int64."""
        return np.rint(np.asarray(values, np.float64) * (self.scale * self.weights)).astype(np.int64)


# Every member of a padded or repeated candidate gets this difference, so any
# subset sum stays below −tolerance and never outranks the match.
def _sentinel(num_members: int) -> int:
    return -(INT32_MAX // num_members)


def _subset_sums(x: jax.Array, axis: int) -> jax.Array:
    """All 2^m subset sums along `axis` (length m), index = bitmask of that axis."""
    sums = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis)) if x.shape[axis] else None
    if sums is None:
        shape = list(x.shape)
        shape[axis] = 1
        return jnp.zeros(shape, x.dtype)
    for k in range(x.shape[axis]):
        member = jax.lax.slice_in_dim(x, k, k + 1, axis=axis)
        sums = jnp.concatenate([sums, sums + member], axis=axis)
    return sums


@partial(jax.jit, static_argnames=("low_members", "ks"))
def count_block(differences: jax.Array, upper: jax.Array, tolerance: jax.Array, *,
                low_members: int, ks: tuple[int, ...]):
    """Count, for every subset, the candidates that outrank the true match.

    Args:
      differences: int32 [C, B, M], q_k(i, j) − q_k(i, i) per candidate j.
      upper: int32 [B, M], bound on the difference of every non-candidate.
      tolerance: int32 [M], per-member error bound of a difference.
      low_members: members 0..low_members−1 form the outer half-subset table.
      ks: requested K values, ascending.

    Returns:
      rank [B, 2^M] int32 = min(#outranking, K_max), near_tie [B, 2^M] bool,
      undecided [B, 2^M] bool; index = subset mask (mask 0 is meaningless).
    """
    num_candidates, block, num_members = differences.shape
    high = num_members - low_members
    k_max = ks[-1]
    low_sums = _subset_sums(differences[..., :low_members], axis=2)    # [C, B, 2^m1]
    high_sums = _subset_sums(differences[..., low_members:], axis=2)   # [C, B, 2^m2]
    tol = (_subset_sums(tolerance[:low_members], axis=0)[:, None]
           + _subset_sums(tolerance[low_members:], axis=0)[None, :])    # [2^m1, 2^m2]
    bound = (_subset_sums(upper[:, :low_members], axis=1)[:, :, None]
             + _subset_sums(upper[:, low_members:], axis=1)[:, None, :])  # [B, 2^m1, 2^m2]

    def accumulate(c, carry):
        outranking, ambiguous = carry
        total = low_sums[c][:, :, None] + high_sums[c][:, None, :]
        outranking = outranking + (total >= 0).astype(jnp.int32)
        ambiguous = ambiguous + (jnp.abs(total) <= tol).astype(jnp.int32)
        return outranking, ambiguous

    zeros = jnp.zeros((block, 1 << low_members, 1 << high), jnp.int32)
    outranking, ambiguous = jax.lax.fori_loop(0, num_candidates, accumulate, (zeros, zeros))

    lowest = outranking - ambiguous
    highest = outranking + ambiguous
    complete = bound < -tol
    undecided = ~((lowest >= k_max) | complete)
    near_tie = jnp.zeros_like(complete)
    for k in ks:
        near_tie = near_tie | ((lowest < k) != (highest < k))
    near_tie = near_tie & complete
    rank = jnp.minimum(outranking, k_max)

    def to_masks(grid):
        return jnp.transpose(grid, (0, 2, 1)).reshape(block, 1 << num_members)

    return to_masks(rank), to_masks(near_tie), to_masks(undecided)


def count_block_reference(differences: np.ndarray, upper: np.ndarray, tolerance: np.ndarray,
                          ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute-force numpy version of `count_block` (int64, one subset at a time)."""
    num_candidates, block, num_members = differences.shape
    k_max = ks[-1]
    size = 1 << num_members
    rank = np.zeros((block, size), np.int64)
    near = np.zeros((block, size), bool)
    undecided = np.zeros((block, size), bool)
    for mask in range(1, size):
        members = subsets.mask_members(mask, num_members)
        total = differences[:, :, members].astype(np.int64).sum(axis=2)    # [C, B]
        tol = int(np.sum(tolerance[members]))
        bound = upper[:, members].astype(np.int64).sum(axis=1)             # [B]
        outranking = (total >= 0).sum(axis=0)
        ambiguous = (np.abs(total) <= tol).sum(axis=0)
        lowest, highest = outranking - ambiguous, outranking + ambiguous
        complete = bound < -tol
        rank[:, mask] = np.minimum(outranking, k_max)
        undecided[:, mask] = ~((lowest >= k_max) | complete)
        flips = np.zeros(block, bool)
        for k in ks:
            flips |= (lowest < k) != (highest < k)
        near[:, mask] = flips & complete
    return rank, near, undecided


def _kernel_block_rows(num_members: int) -> int:
    # Keep the two [B, 2^M] int32 accumulators near 1 MB so they stay in cache.
    return max(1, min(256, (1 << 17) >> num_members))


def _evaluate_mode(source, candidates: Candidates, mode: str, weights: np.ndarray, ks, masks, *,
                   budget: int, progress: bool) -> ModeResult:
    start_time = time.perf_counter()
    n, m = source.num_queries, source.num_members
    weight_error = STD_RELATIVE_ERROR if mode == STANDARDIZED else 0.0
    fixed = FixedPoint.for_mode(weights, source, weight_error=weight_error)
    tolerance = jnp.asarray(fixed.tolerance.astype(np.int32))
    low_members = m // 2
    rank_dtype = np.uint8 if ks[-1] < 256 else np.uint16
    ranks_all = np.empty((n, masks.size), rank_dtype)
    near_flags = np.zeros((n, masks.size), bool)
    undecided_rows: list[np.ndarray] = []
    undecided_masks: list[np.ndarray] = []
    block = min(_kernel_block_rows(m), n)
    sentinel = _sentinel(m)
    reporter = _Progress(f"mode {mode}", n, enabled=progress, unit_scale=masks.size)

    for start in range(0, n, block):
        stop = min(start + block, n)
        diag_q = fixed.quantize(candidates.diagonal[start:stop])                       # [b, M]
        diff = fixed.quantize(np.swapaxes(candidates.values[start:stop], 1, 2)) - diag_q[:, None, :]
        diff[~candidates.valid[start:stop]] = sentinel                                 # [b, C, M]
        upper = _quantize_bound(fixed, candidates.upper[start:stop], diag_q, m)
        rank, near, undecided = _run_kernel(diff, upper, tolerance, low_members, ks, block)
        rows = slice(start, stop)
        ranks_all[rows] = rank[:, masks]
        near_flags[rows] = near[:, masks]
        pending = undecided[:, masks]
        if pending.any():
            # Undecided pairs carry no near-tie flag yet; the recomputation sets it.
            query_index, mask_index = np.nonzero(pending)
            undecided_rows.append(query_index + start)
            undecided_masks.append(mask_index)
        reporter.update(stop - start)

    undecided_pairs = 0
    if undecided_rows:
        rows = np.concatenate(undecided_rows)
        mask_rows = np.concatenate(undecided_masks)
        undecided_pairs = rows.size
        _resolve_undecided(source, fixed, tolerance, low_members, ks, masks, rows, mask_rows,
                           ranks_all, near_flags, budget=budget)

    recall = np.stack([(ranks_all < k).sum(axis=0) for k in ks], axis=1).astype(np.int64)
    near_all = near_flags.sum(axis=0).astype(np.int64)
    near_query, near_row = np.nonzero(near_flags)
    seconds = time.perf_counter() - start_time
    logging.info("mode %s: %d subsets x %d queries in %.2f s; %d (query, subset) pairs (%.3f%%) "
                 "needed the whole gallery; %d near-tie decisions.",
                 mode, masks.size, n, seconds, undecided_pairs,
                 100.0 * undecided_pairs / max(1, masks.size * n), int(near_all.sum()))
    return ModeResult(name=mode, weights=weights, recall=recall, ranks=np.ascontiguousarray(ranks_all.T),
                      near_ties=near_all, near_tie_pairs=np.stack([near_row, near_query], axis=1).astype(np.int64),
                      undecided_pairs=undecided_pairs, seconds=seconds)


def _quantize_bound(fixed: FixedPoint, upper: np.ndarray, diag_q: np.ndarray, num_members: int) -> np.ndarray:
    """Quantise bounds [b, M]: −inf (no non-candidate) to the sentinel, +inf (no bound) to a
    value that keeps every subset undecided."""
    finite = fixed.quantize(np.where(np.isfinite(upper), upper, 0.0)) - diag_q
    bound = np.where(np.isneginf(upper), _sentinel(num_members), finite)
    return np.where(np.isposinf(upper), INT32_MAX // num_members, np.maximum(bound, _sentinel(num_members)))


def _run_kernel(diff: np.ndarray, upper: np.ndarray, tolerance: jax.Array, low_members: int,
                ks: tuple[int, ...], block: int):
    """Pad a block of queries to `block` rows and run `count_block` on it."""
    rows = diff.shape[0]
    if rows < block:
        pad = block - rows
        diff = np.concatenate([diff, np.full((pad,) + diff.shape[1:], diff.min(initial=0), diff.dtype)])
        upper = np.concatenate([upper, np.full((pad, upper.shape[1]), upper.min(initial=0), upper.dtype)])
    differences = jnp.asarray(np.ascontiguousarray(np.transpose(diff, (1, 0, 2))).astype(np.int32))
    out = count_block(differences, jnp.asarray(upper.astype(np.int32)), tolerance,
                      low_members=low_members, ks=ks)
    rank, near, undecided = jax.device_get(out)
    return rank[:rows], near[:rows], undecided[:rows]


@jax.jit
def _full_rows(phi: jax.Array, rows: jax.Array):
    """Diagonal [B, M] and the is-self mask [B, G] for arbitrary query rows."""
    is_self = jnp.arange(phi.shape[2])[None, :] == rows[:, None]
    diagonal = jnp.sum(jnp.where(is_self[None], phi, 0.0), axis=2).T
    return diagonal, is_self


def _resolve_undecided(source, fixed: FixedPoint, tolerance, low_members, ks, masks,
                       rows: np.ndarray, mask_rows: np.ndarray, ranks_all: np.ndarray,
                       near_flags: np.ndarray, *, budget: int) -> None:
    """Recompute undecided (query, subset) pairs over the whole gallery."""
    queries = np.unique(rows)
    m, g = source.num_members, source.num_gallery
    sentinel = _sentinel(m)
    # [b, G, M] int64 differences dominate.
    block = min(_kernel_block_rows(m), _block_rows(8 * 3 * m * g, budget, maximum=256), queries.size)
    by_query: dict[int, list[int]] = {}
    for query, mask_row in zip(rows.tolist(), mask_rows.tolist()):
        by_query.setdefault(query, []).append(mask_row)
    for start in range(0, queries.size, block):
        chunk = queries[start:start + block]
        phi = source.rows(chunk)                                          # [M, b, G]
        diagonal, is_self = jax.device_get(_full_rows(phi, jnp.asarray(chunk)))
        diag_q = fixed.quantize(diagonal)
        diff = fixed.quantize(np.transpose(np.asarray(phi), (1, 2, 0))) - diag_q[:, None, :]
        diff[is_self] = sentinel
        upper = np.full((chunk.size, m), sentinel, np.int64)
        rank, near, _ = _run_kernel(diff, upper, tolerance, low_members, ks, block)
        for row, query in enumerate(chunk.tolist()):
            wanted = np.asarray(by_query[query])
            ranks_all[query, wanted] = rank[row, masks[wanted]]
            near_flags[query, wanted] = near[row, masks[wanted]]


class _Progress:
    """Logs rows done, rate and time left about every 10 seconds."""

    def __init__(self, label: str, total: int, *, enabled: bool, unit_scale: int = 1):
        self.label, self.total, self.enabled, self.unit_scale = label, total, enabled, unit_scale
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 10.0 and self.done < self.total):
            return
        self.last = now
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        left = (self.total - self.done) / max(rate, 1e-9)
        logging.info("%s: %d/%d queries (%s subset evaluations/s), %.0f s elapsed, about %.0f s left",
                     self.label, self.done, self.total, f"{rate * self.unit_scale:,.0f}", elapsed, left)
