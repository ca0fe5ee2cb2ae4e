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
   Σ_{k∈S} w_k θ_k(i) for every subset. Candidates near the match's score
   in some member come first: only they can outrank it.
2. Per mode, candidate scores are quantised to int32 fixed point
   (round(scale · w_k · Φ_k)), which makes every summation order exact, and
   one jitted kernel builds all 2^M subset sums of a block of queries from
   two half-subset tables (2^⌈M/2⌉ and 2^⌊M/2⌋ sums per candidate) and counts,
   for every subset at once, the candidates that outrank the true match. It
   stops after the block's last candidate that can count (queries go in
   blocks of similar candidate counts).
3. A (query, subset) pair is decided when at least K_max candidates
   outrank the match beyond rounding doubt (it fails every K), or when the
   bound shows that no non-candidate can reach the match. The rare undecided
   pairs are recomputed over every gallery item that can still count, with
   the same kernel, or with the same integer rules in numpy when they are few.

Execution. Query rows split over the local devices (`jax.shard_map`) and
over processes (`jax.distributed`); see engine.distributed for why the counts
do not depend on either. The kernel evaluates the subset space in chunks of
the high half-table, and memory keeps per-subset counts plus per-query results
for the current block only. When the per-query ranks of every subset do not
fit the budget, they are kept for the singles and the leading subsets (see
ModeResult). With a `resume.RunCheckpoint`, progress is saved between blocks
and a run resumes from its last save.

Near-ties. A decision is flagged as a near-tie when moving every score that
lies within the float32 error bound of the match's score could change
whether rank < K for some requested K or for K = 1 (which the
exclusive-retrieval and oracle analyses use). Off those, every such
decision equals the float64 brute-force reference in `engine.reference`.
The capped rank between two of those K values can differ from the exact
one by items within that bound (fixed point rounds each member on its own,
so even an exact tie of two sums can come out one unit apart). Requesting
every K up to K_max makes the capped ranks exact off near-ties.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from engine import distributed, resume, similarity, subsets

RAW = "raw"
STANDARDIZED = "standardized"
BUILTIN_MODES = (RAW, STANDARDIZED)

INT32_MAX = 2 ** 31 - 1
# NOTE: an estimated bound on the relative error of σ_k: row moments are
# float32 tree reductions over G terms (about log2(G) roundoffs) combined in
# float64; 2^-19 leaves a margin of about 16x at G = 10^4.
STD_RELATIVE_ERROR = 2.0 ** -19
# Similarity tiles are sized so that this many local devices fit the budget.
MAX_LOCAL_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Mode-independent per-query data from the similarity pass.

    Attributes:
      values: float32 [N, C, M], Φ_k(i, j) for the candidate items j of query i.
      valid: bool [N, C]; False marks padding.
      diagonal: float32 [N, M], Φ_k(i, i).
      upper: float32 [N, M], bound on Φ_k(i, j) for every non-candidate j
        (−inf when the candidates are the whole gallery, +inf when the query
        had more candidates than fit, so that no bound holds).
      leading: int32 [N], how many leading candidates are near the match's
        score in some member. Queries are counted in this order.
      mean, std: float64 [M], population moments of each Φ_k over all N rows.
      first_row: global index of the first query row. A process keeps its own
        contiguous rows, and the other fields cover only those rows.
    """

    values: np.ndarray
    valid: np.ndarray
    diagonal: np.ndarray
    upper: np.ndarray
    leading: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    first_row: int = 0


@dataclasses.dataclass
class ModeResult:
    """Results of one mode for the searched masks.

    Attributes:
      name: mode name.
      weights: float64 [M] weights used.
      recall: int64 [S, len(ks)], queries recalled at each K.
      ranks: uint8 or uint16 [R, N], min(rank, K_max) per query for the
        subsets `rank_masks` (exact as described in the Near-ties
        paragraph of the module docstring). When the ranks of all S subsets fit the memory
        budget, R = S and `rank_masks` equals SearchResult.masks, so row s
        of `ranks` is row s of `recall`. Otherwise R covers the single
        representations and the `rank_subsets` leading subsets of this mode
        (analysis order), computed in a second pass over just those subsets;
        look rows up with `ranks_of`.
      near_ties: int64 [S], queries whose decision at a requested K or at
        K = 1 is within float32 rounding.
      near_tie_pairs: int64 [P, 2], the (subset row, query) of every near-tie
        in a subset of `rank_masks` (subset row indexes SearchResult.masks).
      undecided_pairs: (query, subset) pairs recomputed over the whole gallery.
      seconds: wall time of this mode's evaluation.
      rank_masks: int64 [R], ascending, the subsets that have rows in `ranks`.
    """

    name: str
    weights: np.ndarray
    recall: np.ndarray
    ranks: np.ndarray
    near_ties: np.ndarray
    near_tie_pairs: np.ndarray
    undecided_pairs: int
    seconds: float
    rank_masks: np.ndarray | None = None

    def ranks_of(self, mask: int) -> np.ndarray:
        """Return the ranks [N] of subset `mask`; KeyError when they were not kept."""
        row = int(np.searchsorted(self.rank_masks, mask))
        if row >= len(self.rank_masks) or self.rank_masks[row] != mask:
            raise KeyError(f"per-query ranks of subset mask {mask} were not kept (the ranks of every subset "
                           "did not fit the memory budget); raise --memory_budget_gb or --rank_subsets.")
        return self.ranks[row]


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
      request: what the caller asked for: `max_subset_size` (None when
        unlimited), `subset_list` (the explicit masks before the singles
        were added, or None), `rank_subsets`, and the `devices` and
        `processes` the run used.
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
    request: dict[str, Any] = dataclasses.field(default_factory=dict)

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


def flag_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Return the K values at which near-ties are flagged: the requested ones and K = 1."""
    return tuple(sorted(set(ks) | {1}))


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
    topology: distributed.Topology | None = None,
    rank_subsets: int = 64,
    keep_all_ranks: bool | None = None,
    checkpoint: resume.RunCheckpoint | None = None,
    input_fingerprint: Mapping[str, Any] | None = None,
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
      topology: devices and processes to run on (default: every local device
        of this process; see engine.distributed). Results do not depend on it.
      rank_subsets: when the per-query ranks of every subset do not fit the
        memory budget, ranks are kept for the single representations and
        this many leading subsets per mode (see ModeResult).
      keep_all_ranks: force (True) or forgo (False) the per-query ranks of
        every subset; default: whatever the memory budget allows.
      checkpoint: saves progress and resumes from it (see engine.resume).
      input_fingerprint: identifies the inputs in the checkpoint (e.g. file
        sizes and hashes); default: a hash of the source's arrays.

    Returns:
      A SearchResult, the same on every process.
    """
    num_members = source.num_members
    ks = validate_ks(ks, source.num_gallery)
    if not modes:
        raise ValueError("no mode requested; use raw and/or standardized.")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes repeat in {list(modes)}.")
    if rank_subsets < 0:
        raise ValueError(f"rank_subsets must be >= 0, got {rank_subsets}.")
    request = {"max_subset_size": max_subset_size,
               "subset_list": None if masks is None else sorted({int(x) for x in np.asarray(masks).ravel()}),
               "rank_subsets": rank_subsets}
    masks = _searched_masks(num_members, masks, max_subset_size)
    topology = topology or distributed.local()

    budget = int(memory_budget_gb * 2 ** 30)
    k_max = ks[-1]
    per_member = candidates_per_member or max(128, 4 * k_max)
    per_member = max(1, min(per_member, source.num_gallery - 1)) if source.num_gallery > 1 else 0
    tile = similarity_tile(source, budget)
    all_ranks = _check_budget(source, topology, len(modes), masks.size, per_member, k_max, budget)
    if keep_all_ranks is not None:
        all_ranks = keep_all_ranks
    if not all_ranks:
        logging.info("per-query ranks of all %d subsets do not fit the memory budget; keeping them for the "
                     "single representations and the %d leading subsets per mode", masks.size, rank_subsets)
    if checkpoint is not None:
        checkpoint.bind(_fingerprint(source, ks, modes, weights, masks, per_member, tile, topology,
                                     all_ranks, rank_subsets, input_fingerprint))

    timings: dict[str, float] = {}
    start = time.perf_counter()
    candidates = collect_candidates(source, per_member, budget=budget, progress=progress, topology=topology,
                                    tile=tile, checkpoint=checkpoint)
    timings["similarity_and_candidates"] = time.perf_counter() - start

    mode_weights = resolve_mode_weights(modes, source.names, candidates.std, weights)
    context = _Context(source=source, candidates=candidates, ks=ks, topology=topology, tile=tile,
                       progress=progress, checkpoint=checkpoint)
    results = {}
    for index, (mode, mode_weight) in enumerate(mode_weights.items()):
        start = time.perf_counter()
        results[mode] = _evaluate_mode(context, mode, mode_weight, masks, stage=f"mode_{index}",
                                       all_ranks=all_ranks, rank_subsets=rank_subsets)
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
        request={**request, "devices": topology.num_shards, "processes": topology.process_count},
    )


def _searched_masks(num_members: int, masks: np.ndarray | None, max_subset_size: int | None) -> np.ndarray:
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
    return np.union1d(masks, 1 << np.arange(num_members, dtype=np.int64))


def _fingerprint(source, ks, modes, weights, masks, per_member, tile, topology, all_ranks, rank_subsets,
                 input_fingerprint) -> dict[str, Any]:
    """What a checkpointed run computes; a resume must match every entry."""
    if input_fingerprint is None:
        input_fingerprint = {"source_sha256": source.digest()}
    return {
        "inputs": dict(input_fingerprint),
        "names": list(source.names),
        "num_queries": source.num_queries,
        "num_gallery": source.num_gallery,
        "ks": list(ks),
        "modes": list(modes),
        "custom_weights": {k: [float(x) for x in v] for k, v in sorted((weights or {}).items())},
        "masks": {"count": int(masks.size), "sha256": hashlib.sha256(masks.tobytes()).hexdigest()},
        "candidates_per_member": per_member,
        "similarity_tile_rows": tile,
        "process_count": topology.process_count,
        # Version of the saved candidate arrays; a checkpoint of another layout cannot resume.
        "candidate_layout": 2,
        "ranks": "all subsets" if all_ranks else f"singles and {rank_subsets} leading subsets",
    }


def similarity_tile(source: similarity.SimilaritySource, budget: int) -> int:
    """Rows of every similarity tile: set by the budget and the problem size, never the device count.

    A step gives one tile to each local device, and tiles are sized so that up to
    MAX_LOCAL_DEVICES of them (about 3 copies of [M, rows, G] each) fit a
    quarter of the budget.
    """
    rows = _block_rows(3 * source.bytes_per_query_row(), budget, maximum=256,
                       fraction=0.25 / MAX_LOCAL_DEVICES)
    return max(1, min(rows, source.num_queries))


def _check_budget(source, topology, num_modes, num_masks, per_member, k_max, budget) -> bool:
    """Reject runs whose fixed memory exceeds the budget; return whether all per-query ranks fit."""
    local_queries = -(-source.num_queries // topology.process_count)
    num_candidates = per_member * source.num_members
    candidate_bytes = local_queries * (source.num_members * (num_candidates + 2) * 4 + num_candidates)
    # The gallery side is replicated on every local device.
    resident = source.resident_bytes() * (1 + topology.num_shards)
    fixed = resident + candidate_bytes
    if fixed > budget:
        raise MemoryError(
            f"the search needs about {fixed / 2**30:.2f} GB (features on {topology.num_shards} device(s) "
            f"{resident / 2**30:.2f}, candidates {candidate_bytes / 2**30:.2f}) but "
            f"the memory budget is {budget / 2**30:.2f} GB. Raise --memory_budget_gb, search fewer "
            "representations or use more processes.")
    rank_bytes = num_modes * num_masks * local_queries * (1 if k_max < 256 else 2)
    return fixed + rank_bytes <= 0.75 * budget


def _block_rows(bytes_per_row: int, budget: int, *, maximum: int, fraction: float = 0.25) -> int:
    rows = int(budget * fraction // max(bytes_per_row, 1))
    return max(1, min(maximum, rows))


# ----------------------------------------------------------------------------
# Pass 1: similarity blocks -> candidates and moments.


def _sample_threshold(sample: jax.Array, rank: int, iterations: int = 14) -> jax.Array:
    """Return, per row of `sample` [..., S], a value t with at least `rank` entries >= t.

    Bisection between the row's smallest finite entry and its largest ends
    within (max − min) / 2^iterations below the rank-th largest entry. It
    replaces `lax.top_k`, which took about twice as long on XLA:CPU (jax
    0.10, measured on [11, 231, 752] samples). Any such t gives a valid
    bound, so the candidates change but the results do not.
    """
    low = jnp.min(jnp.where(jnp.isneginf(sample), jnp.inf, sample), axis=-1)
    high = jnp.max(sample, axis=-1)

    def halve(_, bounds):
        low, high = bounds
        middle = low + 0.5 * (high - low)
        enough = jnp.sum(sample >= middle[..., None], axis=-1) >= rank
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    return jax.lax.fori_loop(0, iterations, halve, (low, high))[0]


def _row_cumsum(x: jax.Array, chunk: int = 128) -> jax.Array:
    """Inclusive cumulative sum of int32 [B, G] along axis 1, in two levels.

    Within-chunk sums plus chunk offsets took about half the time of
    jnp.cumsum on XLA:CPU (jax 0.10, measured on [231, 6016] rows).
    """
    rows, length = x.shape
    if length <= 2 * chunk:
        return jnp.cumsum(x, axis=1)
    padded = -(-length // chunk) * chunk
    parts = jnp.pad(x, ((0, 0), (0, padded - length))).reshape(rows, padded // chunk, chunk)
    inner = jnp.cumsum(parts, axis=2)
    offsets = jnp.cumsum(inner[:, :, -1], axis=1) - inner[:, :, -1]
    return (inner + offsets[:, :, None]).reshape(rows, padded)[:, :length]


@partial(jax.jit, static_argnames=("stride", "sample_rank", "capacity", "complete"))
def _candidate_block(phi: jax.Array, rows: jax.Array, margin: jax.Array, inverse_scale: jax.Array, *, stride: int,
                     sample_rank: int, capacity: int, complete: bool):
    """Reduce similarity rows [M, B, G] of the queries `rows` [B] to their candidates.

    A member's threshold θ_k(i) lies just below the `sample_rank`-th largest
    value of every `stride`-th gallery item (the true match excluded), so
    about stride * sample_rank items reach it. Candidates are the items that
    reach the threshold in at least one member. Every other item is below
    θ_k(i) in every member k, so θ bounds the non-candidates. With
    `complete`, every item but the match is a candidate and θ = −inf.

    Candidates within `margin` [M] of the match's score in some member (up to
    rounding, the only ones that can outrank it in some subset) take the
    leading slots, so that the counting kernel can stop early; `leading` [B]
    counts them.

    Returns values [B, capacity, M], valid [B, capacity], diagonal [B, M],
    thresholds [B, M], overflow [B] (more candidates than capacity, so the
    bound does not hold), leading [B], and row moments [M, B] (mean and
    squared deviations of the values times `inverse_scale`, see
    `similarity.row_moments`).
    """
    num_members, block, gallery = phi.shape
    row_index = jnp.arange(block)
    diagonal = phi[:, row_index, rows]                                              # [M, B]
    is_match = jnp.zeros((block, gallery), bool).at[row_index, rows].set(True)
    if complete:
        threshold = jnp.full((num_members, block), -jnp.inf, phi.dtype)
        union = ~is_match
    else:
        sample = phi[:, :, ::stride]
        # The match never sets its own threshold.
        on_grid = jnp.where(rows % stride == 0, -jnp.inf, jnp.inf).astype(phi.dtype)
        sample = sample.at[:, row_index, rows // stride].min(jnp.broadcast_to(on_grid, (num_members, block)))
        threshold = _sample_threshold(sample, sample_rank)
        union = jnp.any(phi >= threshold[..., None], axis=0) & ~is_match
    near_match = jnp.any(phi >= (diagonal - margin[:, None])[..., None], axis=0)
    leading = union & near_match
    other = union & ~near_match
    # Slots: the leading candidates in gallery order, then the others.
    if gallery < 1 << 16:
        # Both running counts share one int32. The high count can reach 2^16 − 1, past the sign
        # bit, so it is masked after the (arithmetic) shift.
        running = _row_cumsum(leading.astype(jnp.int32) + (other.astype(jnp.int32) << 16))
        running_leading, running_other = running & 0xFFFF, (running >> 16) & 0xFFFF
    else:
        running_leading = _row_cumsum(leading.astype(jnp.int32))
        running_other = _row_cumsum(other.astype(jnp.int32))
    num_leading = running_leading[:, -1]
    count = num_leading + running_other[:, -1]
    slot = jnp.where(leading, running_leading - 1,
                     jnp.where(other, num_leading[:, None] + running_other - 1, capacity))
    index = jnp.zeros((block, capacity), jnp.int32).at[row_index[:, None], slot].set(
        jnp.broadcast_to(jnp.arange(gallery, dtype=jnp.int32), (block, gallery)), mode="drop")
    valid = jnp.arange(capacity)[None, :] < count[:, None]
    values = jnp.take_along_axis(phi, jnp.broadcast_to(index[None], (num_members,) + index.shape), axis=2)
    mean, squared_deviations = similarity.row_moments(phi, inverse_scale)
    return (jnp.transpose(values, (1, 2, 0)), valid, diagonal.T, threshold.T, count > capacity,
            jnp.minimum(num_leading, capacity), mean, squared_deviations)


def candidate_block_reference(phi: np.ndarray, rows: np.ndarray, threshold: np.ndarray, margin: np.ndarray,
                              capacity: int) -> dict[str, np.ndarray]:
    """Brute-force numpy version of `_candidate_block` for given thresholds [B, M].

    Returns a dict with `diagonal` [B, M], `count` [B] (candidates per
    query), `leading` [B] (leading candidates, at most `capacity`) and
    `items`. The latter is a list of B int arrays: each query's candidate
    gallery indices in slot order, at most `capacity` of them. Leading ones
    come first, and each group is in gallery order.
    """
    num_members, block, gallery = phi.shape
    diagonal = phi[:, np.arange(block), rows].T
    items, count, leading = [], np.zeros(block, np.int64), np.zeros(block, np.int64)
    for b in range(block):
        others = np.arange(gallery) != rows[b]
        union = (phi[:, b, :] >= threshold[b][:, None]).any(axis=0) & others
        near = (phi[:, b, :] >= (diagonal[b] - margin)[:, None]).any(axis=0)
        ordered = np.concatenate([np.flatnonzero(union & near), np.flatnonzero(union & ~near)])
        items.append(ordered[:capacity])
        count[b] = union.sum()
        leading[b] = min(int((union & near).sum()), capacity)
    return {"diagonal": diagonal, "count": count, "leading": leading, "items": items}


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
    topology: distributed.Topology | None = None,
    tile: int | None = None,
    checkpoint: resume.RunCheckpoint | None = None,
) -> Candidates:
    """Run pass 1 over this process's query rows (see the module docstring).

    The moments are gathered from every process, so `mean` and `std` cover
    all N rows; the other fields cover this process's rows only.
    """
    n, m, g = source.num_queries, source.num_members, source.num_gallery
    topology = topology or distributed.local()
    tile = tile or similarity_tile(source, budget)
    first, last = topology.row_range(n, tile)
    if checkpoint is not None:
        saved = checkpoint.load("candidates")
        if saved is not None:
            logging.info("similarity pass restored from the checkpoint")
            return Candidates(**saved[0], first_row=first)

    layout = candidate_layout(m, g, per_member)
    capacity = layout["capacity"]
    local = last - first
    values = np.empty((local, capacity, m), np.float32)
    valid = np.empty((local, capacity), bool)
    diagonal = np.empty((local, m), np.float32)
    upper = np.empty((local, m), np.float32)
    overflow = np.empty(local, bool)
    leading = np.empty(local, np.int32)
    row_mean = np.empty((local, m), np.float32)
    row_m2 = np.empty((local, m), np.float32)
    margin = leading_margin(source)
    inverse_scale = similarity.moment_scales(source.value_bounds)
    axis = distributed.AXIS

    def kernel_on(devices: distributed.Topology):
        return devices.per_device(
            partial(_candidate_block, **layout), in_specs=(P(None, axis, None), P(axis), P(), P()),
            out_specs=(P(axis),) * 6 + (P(None, axis),) * 2,
            key=("candidates",) + tuple(sorted(layout.items())))

    filled = []

    def store_rows(start: int, stop: int, out) -> None:
        rows = stop - start
        out = jax.device_get(out)
        local_rows = slice(start - first, stop - first)
        # Candidates are packed first, so copying only the used slots leaves the
        # rest of `values` untouched and its memory pages never faulted in.
        used = int(out[1][:rows].sum(axis=1).max())
        values[local_rows, :used], valid[local_rows] = out[0][:rows, :used], out[1][:rows]
        filled.append((local_rows, used))
        diagonal[local_rows], upper[local_rows] = out[2][:rows], out[3][:rows]
        overflow[local_rows], leading[local_rows] = out[4][:rows], out[5][:rows]
        row_mean[local_rows], row_m2[local_rows] = out[6][:, :rows].T, out[7][:, :rows].T
        reporter.update(rows)

    step = tile * topology.num_shards
    reporter = _Progress("similarity pass", local, enabled=progress)
    previous = None
    for number, start in enumerate(range(first, last, step)):
        stop = min(start + step, last)
        # Padding repeats the last row; every device used gets a full tile.
        devices = topology.leading(-(-(stop - start) // tile))
        indices = np.minimum(np.arange(start, start + tile * devices.num_shards), stop - 1).astype(np.int32)
        # Two staging buffers alternate, and the kernel that last read this one has finished
        # because its tile was stored below.
        phi = source.tile_rows(indices, devices, buffer=number % 2)
        out = kernel_on(devices)(phi, devices.shard(indices, axis), devices.shard(margin), devices.shard(inverse_scale))
        # Dispatch is asynchronous, so the previous tile is stored while this one runs.
        if previous is not None:
            store_rows(*previous)
        previous = (start, stop, out)
    if previous is not None:
        store_rows(*previous)
    # A query with more candidates than capacity has no valid bound.
    upper[overflow] = np.inf
    # Candidates are packed first, so the slots that no query uses are left out (a view, not a copy).
    used = int(valid.sum(axis=1).max()) if local else 0
    width = min(capacity, max(1, -(-used // 32) * 32))
    for local_rows, tile_used in filled:
        values[local_rows, tile_used:width] = 0.0
    mean, std = similarity.combine_row_moments(topology.gather_rows(row_mean).T, topology.gather_rows(row_m2).T, g,
                                               inverse_scale)
    # Rounding in the float32 mean leaves a tiny spread for a constant matrix, so members that the
    # source records as constant get exactly 0.
    std = np.where(source.constant_members, 0.0, std)
    candidates = Candidates(values=values[:, :width], valid=valid[:, :width], diagonal=diagonal, upper=upper,
                            leading=leading, mean=mean, std=std, first_row=first)
    if checkpoint is not None:
        arrays = {f.name: getattr(candidates, f.name) for f in dataclasses.fields(Candidates) if f.name != "first_row"}
        checkpoint.save("candidates", arrays, {"first_row": first})
    return candidates


def leading_margin(source: similarity.SimilaritySource) -> np.ndarray:
    """Per-member float32 margin [M] of the leading candidates (see `_candidate_block`).

    Twice the error bound plus 2^-17 of the value bound covers the tolerance
    of the built-in modes with room to spare. A custom weighting that the
    margin does not cover only makes counting slower, never wrong: the
    counting kernel finds its own exact stopping point.
    """
    return (2.0 * source.error_bounds + 2.0 ** -17 * source.value_bounds).astype(np.float32)


# ----------------------------------------------------------------------------
# Pass 2: fixed-point subset counts.


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Quantisation of one mode: q = round(scale · w_k · Φ_k) in int32.

    `weights` w are the mode's weights divided by their maximum.

    `scale` is chosen so that any subset sum of differences fits in int32;
    `tolerance` [M] is, per member, the integer error bound of a difference
    (float32 error of Φ, error of the standardisation weight, rounding).

    NOTE: one scale serves every member, so a member whose weighted values
    are tiny next to the others' (a custom weight 10^-9 times the rest, or
    one matrix entry far larger than all others) keeps only a few integer
    steps. Its decisions are then flagged as near-ties rather than decided.
    """

    scale: float
    weights: np.ndarray
    tolerance: np.ndarray

    @classmethod
    def for_mode(cls, weights: np.ndarray, source: similarity.SimilaritySource, *, weight_error: float
                 ) -> "FixedPoint":
        # Rankings do not change when every weight is multiplied by the same
        # positive number, so the largest weight becomes 1 and the scale
        # depends only on the relative weights and the value bounds.
        weights = np.asarray(weights, np.float64)
        weights = weights / weights.max() if weights.max() > 0 else weights
        total = float(np.sum(weights * source.value_bounds))
        # A difference of two quantised values is within 1 of scale · w_k times the exact
        # one, so any subset sum stays within 2 · scale · total + M, below INT32_MAX.
        scale = (INT32_MAX - 4.0 * len(weights)) / (2.0 * total * (1.0 + 1e-6)) if total > 0 else 1.0
        error = source.error_bounds + weight_error * source.value_bounds
        # A zero weight quantises every value to exactly 0, with no rounding to allow for.
        tolerance = np.where(weights > 0, np.ceil(2.0 * scale * weights * error) + 2, 0).astype(np.int64)
        return cls(scale=scale, weights=weights, tolerance=tolerance)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Quantise float values [..., M] (member axis last) to int64."""
        return np.rint(np.asarray(values, np.float64) * (self.scale * self.weights)).astype(np.int64)

    def differences(self, values: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
        """Return int32 q(values) − q(diagonal) for values [b, C, M] and diagonal [b, M].

        The same numbers as `quantize` (the subtraction of two integers is
        exact in float64), with fewer passes over memory. Every difference
        fits in int32 by the choice of `scale`.
        """
        factor = self.scale * self.weights
        q = np.multiply(values, factor, dtype=np.float64)
        np.rint(q, out=q)
        q -= np.rint(np.multiply(diagonal, factor, dtype=np.float64))[:, None, :]
        return q.astype(np.int32)


# Every member of a padded or repeated candidate gets this difference, so any
# subset sum stays below −tolerance and never outranks the match.
def _sentinel(num_members: int) -> int:
    return -(INT32_MAX // num_members)


def _subset_sums(x: jax.Array, axis: int) -> jax.Array:
    """Return all 2^m subset sums along `axis` (length m), indexed by the bitmask of that axis."""
    sums = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis)) if x.shape[axis] else None
    if sums is None:
        shape = list(x.shape)
        shape[axis] = 1
        return jnp.zeros(shape, x.dtype)
    for k in range(x.shape[axis]):
        member = jax.lax.slice_in_dim(x, k, k + 1, axis=axis)
        sums = jnp.concatenate([sums, sums + member], axis=axis)
    return sums


def _ambiguity_limit(tol):
    """Return the bound below which |total| is ambiguous: tol + 1, or 0 where tol is 0.

    A subset of zero-weight members has tolerance 0. Its totals are exactly 0
    with no rounding, so a tie there is a tie, not a near-tie.
    """
    return tol + (tol > 0)


def _decide(outranking, ambiguous, bound, tol, ks):
    """Shared tail of the counting kernels: ranks, near-tie and undecided flags."""
    k_max = ks[-1]
    lowest = outranking - ambiguous
    highest = outranking + ambiguous
    complete = bound < -tol
    undecided = ~((lowest >= k_max) | complete)
    near_tie = jnp.zeros_like(complete)
    for k in ks:
        near_tie = near_tie | ((lowest < k) != (highest < k))
    return jnp.minimum(outranking, k_max), near_tie & complete, undecided


# Two counts below 2^15 fit in one int32: the low 16 bits and the high 15.
_PACKED_LIMIT = 1 << 16
_PACKED_MAX_CANDIDATES = 1 << 15
# Candidates per loop iteration of the counting kernels.
_UNROLL = 4


def _counting_order(differences: jax.Array, tolerance: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return differences [C', B, M] (candidate axis first, padded to a multiple of _UNROLL)
    and the number of loop iterations that reach every candidate that can count.

    A candidate whose difference is below −tolerance_k in every member k has
    a subset sum below −tolerance_S for every subset S (weights are
    non-negative), so it neither outranks the match nor is ambiguous. The
    loop stops after the last candidate, over the block's rows, that can.
    """
    block, num_candidates, num_members = differences.shape
    pad = -num_candidates % _UNROLL
    if pad:
        differences = jnp.pad(differences, ((0, 0), (0, pad), (0, 0)), constant_values=_sentinel(num_members))
    can_count = jnp.any(differences >= -tolerance, axis=(0, 2))                           # [C']
    last = jnp.max(jnp.where(can_count, jnp.arange(can_count.size, dtype=jnp.int32) + 1, 0))
    return jnp.transpose(differences, (1, 0, 2)), (last + _UNROLL - 1) // _UNROLL


def _unrolled_loop(iterations: jax.Array, body, init):
    """Run body(candidate, carry) in a fori_loop of `iterations` steps, _UNROLL candidates per step."""
    def step(i, carry):
        for u in range(_UNROLL):
            carry = body(i * _UNROLL + u, carry)
        return carry

    return jax.lax.fori_loop(0, iterations, step, init)


def _membership(num_members: int) -> np.ndarray:
    """Return the int32 [m, 2^m] table whose entry (k, mask) is 1 when bit k of mask is set."""
    return ((np.arange(1 << num_members)[None, :] >> np.arange(num_members)[:, None]) & 1).astype(np.int32)


@partial(jax.jit, static_argnames=("low_members", "ks", "high_count"))
def count_block(differences: jax.Array, upper: jax.Array, tolerance: jax.Array, high_start: jax.Array | int = 0, *,
                low_members: int, ks: tuple[int, ...], high_count: int | None = None):
    """Count, for every subset, the candidates that outrank the true match.

    Args:
      differences: int32 [B, C, M], q_k(i, j) − q_k(i, i) per candidate j.
      upper: int32 [B, M], bound on the difference of every non-candidate.
      tolerance: int32 [M], per-member error bound of a difference.
      high_start: first value of the high half (members low_members..M−1)
        evaluated; with `high_count`, the chunk of subsets with masks in
        [high_start · 2^m1, (high_start + high_count) · 2^m1).
      low_members: m1; members 0..m1−1 form the outer half-subset table.
      ks: requested K values, ascending.
      high_count: number of high-half values per call (default all 2^(M−m1)).

    Returns:
      rank [B, S'] int32 = min(#outranking, K_max), near_tie [B, S'] bool,
      undecided [B, S'] bool, with S' = high_count · 2^m1 and column
      mask − high_start · 2^m1 (with the defaults, column = mask; mask 0 is
      meaningless).
    """
    block, _, num_members = differences.shape
    high = num_members - low_members
    high_count = (1 << high) if high_count is None else high_count
    differences, iterations = _counting_order(differences, tolerance)

    def high_part(sums, axis):
        return jax.lax.dynamic_slice_in_dim(sums, high_start, high_count, axis=axis)

    low_members_of = jnp.asarray(_membership(low_members))
    high_members_of = high_part(jnp.asarray(_membership(high)), 1)

    def subset_sums(c):
        # Half-subset sums of candidate c, [B, 2^m1] and [B, H], by multiply-and-sum. Built per
        # candidate, they cost in proportion to the candidates that can count, whereas tables
        # for all C slots cost more than the loop itself at typical C.
        d = differences[c]
        return (jnp.sum(d[:, :low_members, None] * low_members_of[None], axis=1),
                jnp.sum(d[:, low_members:, None] * high_members_of[None], axis=1))

    tol = (_subset_sums(tolerance[:low_members], axis=0)[:, None]
           + high_part(_subset_sums(tolerance[low_members:], axis=0), 0)[None, :])        # [2^m1, H]
    limit = _ambiguity_limit(tol)
    bound = (_subset_sums(upper[:, :low_members], axis=1)[:, :, None]
             + high_part(_subset_sums(upper[:, low_members:], axis=1), 1)[:, None, :])    # [B, 2^m1, H]

    zeros = jnp.zeros((block, 1 << low_members, high_count), jnp.int32)
    if differences.shape[0] < _PACKED_MAX_CANDIDATES:
        # Both counts share one int32 (ambiguous in the high 16 bits), which
        # saves an add per cell: about 1.6x faster on XLA:CPU (jax 0.10).
        def accumulate_packed(c, packed):
            low_sums, high_sums = subset_sums(c)
            total = low_sums[:, :, None] + high_sums[:, None, :]
            return (packed + jnp.where(total >= 0, 1, 0)
                    + jnp.where(jnp.abs(total) < limit, _PACKED_LIMIT, 0))

        packed = _unrolled_loop(iterations, accumulate_packed, zeros)
        outranking, ambiguous = packed & (_PACKED_LIMIT - 1), packed >> 16
    else:
        def accumulate(c, carry):
            outranking, ambiguous = carry
            low_sums, high_sums = subset_sums(c)
            total = low_sums[:, :, None] + high_sums[:, None, :]
            outranking = outranking + (total >= 0).astype(jnp.int32)
            ambiguous = ambiguous + (jnp.abs(total) < limit).astype(jnp.int32)
            return outranking, ambiguous

        outranking, ambiguous = _unrolled_loop(iterations, accumulate, (zeros, zeros))

    def to_masks(grid):
        return jnp.transpose(grid, (0, 2, 1)).reshape(block, high_count << low_members)

    return tuple(to_masks(x) for x in _decide(outranking, ambiguous, bound, tol, ks))


@partial(jax.jit, static_argnames=("ks",))
def count_masks(differences: jax.Array, upper: jax.Array, tolerance: jax.Array, members: jax.Array, *,
                ks: tuple[int, ...]):
    """`count_block` for an explicit list of S subsets.

    Args:
      differences, upper, tolerance: as for `count_block`.
      members: int32 [M, S], 0/1 membership of each subset.
      ks: requested K values, ascending.

    Returns:
      rank, near_tie, undecided [B, S], as `count_block` returns them.
    """
    block = differences.shape[0]
    differences, iterations = _counting_order(differences, tolerance)
    tol = tolerance @ members                       # [S]
    limit = _ambiguity_limit(tol)
    bound = upper @ members                         # [B, S]

    def accumulate(c, carry):
        outranking, ambiguous = carry
        total = differences[c] @ members            # [B, S], exact in int32
        outranking = outranking + (total >= 0).astype(jnp.int32)
        ambiguous = ambiguous + (jnp.abs(total) < limit).astype(jnp.int32)
        return outranking, ambiguous

    zeros = jnp.zeros((block, members.shape[1]), jnp.int32)
    outranking, ambiguous = _unrolled_loop(iterations, accumulate, (zeros, zeros))
    return _decide(outranking, ambiguous, bound, tol, ks)


def count_block_reference(differences: np.ndarray, upper: np.ndarray, tolerance: np.ndarray,
                          ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute-force numpy version of `count_block` (int64, one subset at a time, every candidate)."""
    block, num_candidates, num_members = differences.shape
    k_max = ks[-1]
    size = 1 << num_members
    rank = np.zeros((block, size), np.int64)
    near = np.zeros((block, size), bool)
    undecided = np.zeros((block, size), bool)
    for mask in range(1, size):
        members = subsets.mask_members(mask, num_members)
        total = differences[:, :, members].astype(np.int64).sum(axis=2)    # [B, C]
        tol = int(np.sum(tolerance[members]))
        bound = upper[:, members].astype(np.int64).sum(axis=1)             # [B]
        outranking = (total >= 0).sum(axis=1)
        ambiguous = (np.abs(total) < _ambiguity_limit(tol)).sum(axis=1)
        lowest, highest = outranking - ambiguous, outranking + ambiguous
        complete = bound < -tol
        rank[:, mask] = np.minimum(outranking, k_max)
        undecided[:, mask] = ~((lowest >= k_max) | complete)
        flips = np.zeros(block, bool)
        for k in ks:
            flips |= (lowest < k) != (highest < k)
        near[:, mask] = flips & complete
    return rank, near, undecided


def _count_and_reduce(differences, upper, row_valid, tolerance, argument, *, count, ks, rank_dtype):
    """Count a block on one device with `count`, then sum the decided outcomes over its rows.

    Returns recall [1, S', K] and near-tie counts [1, S'] over the decided
    (query, subset) pairs of the valid rows, and rank, near_tie, undecided [B, S'].
    """
    rank, near, undecided = count(differences, upper, tolerance, argument)
    undecided = undecided & row_valid[:, None]
    decided = row_valid[:, None] & ~undecided
    recall = jnp.stack([jnp.sum((rank < k) & decided, axis=0, dtype=jnp.int32) for k in ks], axis=1)
    near_ties = jnp.sum(near & decided, axis=0, dtype=jnp.int32)
    return recall[None], near_ties[None], rank.astype(rank_dtype), near, undecided


# Cells of the [B, 2^m1, H] accumulators of one kernel call: about 1 MB of
# int32 each, so they stay in cache.
KERNEL_CELLS = 1 << 17


def _kernel_block_rows(num_members: int) -> int:
    return max(1, min(256, KERNEL_CELLS >> num_members))


@dataclasses.dataclass(frozen=True)
class _Context:
    """Inputs and settings shared by every sweep of a search."""

    source: similarity.SimilaritySource
    candidates: Candidates
    ks: tuple[int, ...]
    topology: distributed.Topology
    tile: int
    progress: bool
    checkpoint: resume.RunCheckpoint | None


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """Return `index` as a slice when it is a contiguous ascending range (cheaper to index with)."""
    if index.size and index[-1] - index[0] + 1 == index.size and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


@dataclasses.dataclass
class _BlockCounts:
    """Outcomes of a block of b queries for the S masks of a sweep.

    Attributes:
      recall: int64 [S, K], decided pairs recalled at each K, summed over the rows.
      near_ties: int64 [S], decided near-ties summed over the rows.
      rank, near, undecided: [b, S] per-pair outcomes.
    """

    recall: np.ndarray
    near_ties: np.ndarray
    rank: np.ndarray
    near: np.ndarray
    undecided: np.ndarray


class _Counter:
    """Counts outranking candidates for the masks [S] of one sweep, on every local device.

    The full-table kernel `count_block` runs over chunks of the high
    half-table (only chunks that hold a searched mask); a short explicit list
    of subsets uses `count_masks` instead, whichever evaluates fewer cells.
    Each device also sums its block's decided outcomes, so the host only
    copies them.
    """

    def __init__(self, masks: np.ndarray, num_members: int, ks: tuple[int, ...], topology: distributed.Topology):
        self.masks, self.ks, self.topology = masks, ks, topology
        # Near-ties are flagged for K = 1 too, because the exclusive-retrieval and oracle analyses use it.
        self.flag_ks = flag_ks(ks)
        self.rank_dtype = np.uint8 if ks[-1] < 256 else np.uint16
        low = num_members // 2
        grid_block = _kernel_block_rows(num_members)
        high_count = min(1 << (num_members - low), max(1, KERNEL_CELLS // (grid_block << low)))
        starts = np.unique((masks >> low) // high_count) * high_count
        axis = distributed.AXIS
        in_specs = (P(axis, None, None), P(axis, None), P(axis), P(), P())
        out_specs = (P(axis),) * 5
        self.use_grid = starts.size * (high_count << low) <= masks.size * num_members
        if self.use_grid:
            self.block = grid_block
            count = partial(count_block, low_members=low, ks=self.flag_ks, high_count=high_count)
            key = ("count_block", low, ks, high_count)
            self.parts = []
            for start in starts.tolist():
                first, stop = start << low, (start + high_count) << low
                selected = np.flatnonzero((masks >= first) & (masks < stop))
                self.parts.append((jnp.int32(start), masks[selected] - first, selected))
        else:
            width = min(masks.size, KERNEL_CELLS)
            self.block = max(1, min(256, KERNEL_CELLS // width))
            count = partial(count_masks, ks=self.flag_ks)
            key = ("count_masks", ks)
            self.parts = []
            for first in range(0, masks.size, width):
                selected = np.arange(first, min(first + width, masks.size))
                members = np.zeros((num_members, width), np.int32)
                members[:, :selected.size] = subsets.member_matrix(masks[selected], num_members).T
                self.parts.append((topology.shard(members), np.arange(selected.size), selected))
        self.parts = [(argument, _as_slice(columns), _as_slice(selected)) for argument, columns, selected in self.parts]
        self.kernel = topology.per_device(
            partial(_count_and_reduce, count=count, ks=ks, rank_dtype=self.rank_dtype), in_specs=in_specs,
            out_specs=out_specs, key=key + ("reduce", np.dtype(self.rank_dtype).name))

    @property
    def step_rows(self) -> int:
        return self.block * self.topology.num_shards

    def count(self, diff: np.ndarray, upper: np.ndarray, tolerance: jax.Array,
              needed: np.ndarray | None = None) -> _BlockCounts:
        """Count a block of b <= step_rows queries: differences [b, C, M] and bounds [b, M].

        Columns outside `needed` (bool [S]) may be skipped and left zero.
        """
        return self.collect(self.dispatch(diff, upper, tolerance, needed))

    def dispatch(self, diff: np.ndarray, upper: np.ndarray, tolerance: jax.Array,
                 needed: np.ndarray | None = None):
        """Start counting a block (as `count`) and return a handle for `collect`.

        JAX dispatch is asynchronous: the host can prepare the next block meanwhile.
        """
        rows = diff.shape[0]
        pad = self.step_rows - rows
        sentinel = _sentinel(diff.shape[2])
        if pad:
            diff = np.concatenate([diff, np.full((pad,) + diff.shape[1:], sentinel, diff.dtype)])
            upper = np.concatenate([upper, np.full((pad, upper.shape[1]), sentinel, upper.dtype)])
        axis = distributed.AXIS
        differences = self.topology.shard(diff.astype(np.int32, copy=False), axis, None, None)
        bounds = self.topology.shard(upper.astype(np.int32, copy=False), axis, None)
        row_valid = self.topology.shard(np.arange(self.step_rows) < rows, axis)
        started = [(self.kernel(differences, bounds, row_valid, tolerance, argument), columns, selected)
                   for argument, columns, selected in self.parts
                   if needed is None or needed[selected].any()]
        return rows, started

    def collect(self, handle) -> _BlockCounts:
        """Wait for a block started by `dispatch` and return its counts."""
        rows, started = handle
        size = self.masks.size
        result = _BlockCounts(recall=np.zeros((size, len(self.ks)), np.int64), near_ties=np.zeros(size, np.int64),
                              rank=np.zeros((rows, size), self.rank_dtype), near=np.zeros((rows, size), bool),
                              undecided=np.zeros((rows, size), bool))
        for out, columns, selected in started:
            out = jax.device_get(out)
            result.recall[selected] = out[0].sum(axis=0, dtype=np.int64)[columns]
            result.near_ties[selected] = out[1].sum(axis=0, dtype=np.int64)[columns]
            result.rank[:, selected] = out[2][:rows, columns]
            result.near[:, selected] = out[3][:rows, columns]
            result.undecided[:, selected] = out[4][:rows, columns]
        return result


@dataclasses.dataclass
class _Counts:
    """Outputs of a sweep: per-subset counts and the per-query ranks of the kept columns.

    Attributes:
      recall: int64 [S, K] over this process's queries.
      near_ties: int64 [S].
      ranks: [n, R], ranks of the kept columns for this process's n queries.
      near_pairs: int64 [P, 2], (kept column, query) of every near-tie in a kept column.
      undecided: (query, subset) pairs recomputed over the whole gallery.
      rows_done: how many queries of the sweep's order are done.
    """

    recall: np.ndarray
    near_ties: np.ndarray
    ranks: np.ndarray
    near_pairs: np.ndarray
    undecided: int = 0
    rows_done: int = 0

    def add(self, rank, near, counted, rows: np.ndarray, keep: np.ndarray, ks, first_row: int) -> None:
        """Add the (query, subset) outcomes marked by `counted` [b, S] of local query rows [b]."""
        for j, k in enumerate(ks):
            self.recall[:, j] += ((rank < k) & counted).sum(axis=0)
        self.near_ties += (near & counted).sum(axis=0)
        kept = counted[:, keep]
        self.ranks[rows] = np.where(kept, rank[:, keep], self.ranks[rows])
        self._add_near_pairs(near[:, keep] & kept, rows, first_row)

    def add_block(self, block: _BlockCounts, rows: np.ndarray, keep: np.ndarray | slice, first_row: int) -> None:
        """Add the decided outcomes of a counted block of local query rows [b].

        The ranks of undecided pairs are stored too; their recomputation overwrites them.
        """
        self.recall += block.recall
        self.near_ties += block.near_ties
        self.ranks[rows] = block.rank[:, keep]
        # A near-tie is flagged only where the bound holds, so never on an undecided pair.
        self._add_near_pairs(block.near[:, keep], rows, first_row)

    def _add_near_pairs(self, near: np.ndarray, rows: np.ndarray, first_row: int) -> None:
        query, column = np.nonzero(near)
        if query.size:
            pairs = np.stack([column, rows[query] + first_row], axis=1).astype(np.int64)
            self.near_pairs = np.concatenate([self.near_pairs, pairs])


def _sweep(context: _Context, fixed: FixedPoint, masks: np.ndarray, keep: np.ndarray, *, stage: str,
           label: str) -> _Counts:
    """Evaluate `masks` for this process's queries, keeping the ranks of columns `keep`.

    Queries go in descending order of their leading candidates, so each
    block's rows stop counting at about the same candidate (and the progress
    estimate errs on the long side).
    """
    source, candidates, ks, topology = context.source, context.candidates, context.ks, context.topology
    m = source.num_members
    local = candidates.values.shape[0]
    counter = _Counter(masks, m, ks, topology)
    tolerance = topology.shard(fixed.tolerance.astype(np.int32))
    counts = _Counts(recall=np.zeros((masks.size, len(ks)), np.int64), near_ties=np.zeros(masks.size, np.int64),
                     ranks=np.zeros((local, keep.size), counter.rank_dtype), near_pairs=np.zeros((0, 2), np.int64))
    saved = context.checkpoint.load(stage) if context.checkpoint is not None else None
    if saved is not None:
        arrays, meta = saved
        counts = _Counts(**arrays, undecided=meta["undecided"], rows_done=meta["rows_done"])
        logging.info("%s: restored %d of %d queries from the checkpoint", label, counts.rows_done, local)

    order = np.argsort(-candidates.leading.astype(np.int64), kind="stable")
    keep_index = _as_slice(keep)
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        if pending:
            _resolve_undecided(context, fixed, counter, tolerance, pending, counts, keep)
            pending.clear()

    def start_block(start: int):
        stop = min(start + counter.step_rows, local)
        rows = order[start:stop]
        return start, stop, rows, counter.dispatch(*_quantized_candidates(fixed, candidates, rows), tolerance)

    reporter = _Progress(label, local - counts.rows_done, enabled=context.progress, unit_scale=masks.size,
                         unit="subset evaluations")
    starts = list(range(counts.rows_done, local, counter.step_rows))
    running = start_block(starts[0]) if starts else None
    for index in range(len(starts)):
        start, stop, rows, handle = running
        # The next block is quantised while this one counts.
        running = start_block(starts[index + 1]) if index + 1 < len(starts) else None
        block = counter.collect(handle)
        counts.add_block(block, rows, keep_index, candidates.first_row)
        for row in np.flatnonzero(block.undecided.any(axis=1)):
            pending.append((int(rows[row]), np.flatnonzero(block.undecided[row])))
        counts.undecided += int(block.undecided.sum())
        counts.rows_done = stop
        if len(pending) >= context.tile * topology.num_shards:
            flush()
        if context.checkpoint is not None and context.checkpoint.due() and stop < local:
            flush()
            _save_counts(context.checkpoint, stage, counts)
        reporter.update(stop - start)
    flush()
    if context.checkpoint is not None:
        _save_counts(context.checkpoint, stage, counts)
    return counts


def _save_counts(checkpoint: resume.RunCheckpoint, stage: str, counts: _Counts) -> None:
    arrays = {"recall": counts.recall, "near_ties": counts.near_ties, "ranks": counts.ranks,
              "near_pairs": counts.near_pairs}
    checkpoint.save(stage, arrays, {"undecided": counts.undecided, "rows_done": counts.rows_done})


def _quantized_candidates(fixed: FixedPoint, candidates: Candidates, rows: np.ndarray):
    """Return int32 differences [b, C, M] and bounds [b, M] of the local query rows `rows` [b]."""
    num_members = candidates.diagonal.shape[1]
    diagonal = candidates.diagonal[rows]
    diff = fixed.differences(candidates.values[rows], diagonal)
    diff[~candidates.valid[rows]] = _sentinel(num_members)
    return diff, _quantize_bound(fixed, candidates.upper[rows], fixed.quantize(diagonal), num_members)


# Below this many (pair, item) cells, undecided pairs are counted in numpy: a
# new kernel shape would cost more to compile (about a second) than it saves.
_DIRECT_CELLS = 1 << 24


def _count_pairs_directly(diff: np.ndarray, tolerance: np.ndarray, masks: np.ndarray, counted: np.ndarray,
                          ks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Count the (query, subset) pairs marked in `counted` over all items, in int64.

    The same integer decisions as `count_block` with no bound (every item is
    present): rank = min(#outranking, K_max), near-tie when the ambiguous
    items could move the rank across a requested K.

    Args:
      diff: int [b, C, M] differences over the items that can count.
      tolerance: int [M] per-member tolerance.
      masks: int64 [S] subset masks (columns of `counted`).
      counted: bool [b, S] the pairs to count.
      ks: requested K values, ascending.

    Returns:
      rank int [b, S] and near_tie bool [b, S], filled at the counted pairs.
    """
    num_members = diff.shape[2]
    rank = np.zeros(counted.shape, np.int64)
    near = np.zeros(counted.shape, bool)
    tolerance = np.asarray(tolerance, np.int64)
    for row, column in zip(*np.nonzero(counted)):
        members = subsets.mask_members(int(masks[column]), num_members)
        total = diff[row][:, members].astype(np.int64).sum(axis=1)
        tol = int(tolerance[members].sum())
        outranking = int((total >= 0).sum())
        ambiguous = int((np.abs(total) < _ambiguity_limit(tol)).sum())
        rank[row, column] = min(outranking, ks[-1])
        near[row, column] = any((outranking - ambiguous < k) != (outranking + ambiguous < k) for k in ks)
    return rank, near


def _drop_hopeless_items(diff: np.ndarray, tolerance: np.ndarray, sentinel: int) -> np.ndarray:
    """Keep, per query, only the gallery items that can count for some subset.

    An item whose difference is below −tolerance_k in every member k has a
    subset sum below −tolerance_S for every subset S (weights are
    non-negative), so it neither outranks the match nor is ambiguous. The kept
    items come first. The width is the largest count in the block rounded up
    to a power of two, which keeps kernel shapes few, and padding is the sentinel.

    Args:
      diff: int64 [b, G, M] quantised differences, the match already the sentinel.
      tolerance: int [M] per-member tolerance.
      sentinel: the difference of padding.
    """
    relevant = (diff >= -np.asarray(tolerance, np.int64)[None, None, :]).any(axis=2)     # [b, G]
    count = int(relevant.sum(axis=1).max()) if relevant.size else 0
    width = min(diff.shape[1], 1 << max(5, (max(count, 1) - 1).bit_length()))
    if width >= diff.shape[1]:
        return diff
    order = np.argsort(~relevant, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(diff, order[:, :, None], axis=1)
    kept[~np.take_along_axis(relevant, order, axis=1)] = sentinel
    return kept


def _resolve_undecided(context: _Context, fixed: FixedPoint, counter: _Counter, tolerance: jax.Array,
                       pending: list[tuple[int, np.ndarray]], counts: _Counts, keep: np.ndarray) -> None:
    """Recompute the pending (local query, subset columns) pairs over the whole gallery.

    Similarity rows are computed in full tiles, one per local device, so each
    row's values are those of any other run (see engine.distributed).
    """
    source, topology = context.source, context.topology
    first_row = context.candidates.first_row
    sentinel = _sentinel(source.num_members)
    group = context.tile * topology.num_shards
    for group_start in range(0, len(pending), group):
        members = pending[group_start:group_start + group]
        rows = np.array([row for row, _ in members])
        devices = topology.leading(-(-rows.size // context.tile))
        indices = np.full(context.tile * devices.num_shards, rows[-1] + first_row, np.int32)
        indices[:rows.size] = rows + first_row
        phi = np.asarray(jax.device_get(source.tile_rows(indices, devices)))         # [M, tiles, G]
        for start in range(0, rows.size, counter.step_rows):
            part = slice(start, min(start + counter.step_rows, rows.size))
            block_rows = rows[part]
            queries = block_rows + first_row
            block = np.transpose(phi[:, part], (1, 2, 0))                             # [b, G, M]
            here = np.arange(block_rows.size)
            diag_q = fixed.quantize(block[here, queries])
            diff = fixed.quantize(block) - diag_q[:, None, :]
            diff[here, queries] = sentinel
            diff = _drop_hopeless_items(diff, fixed.tolerance, sentinel)
            upper = np.full((block_rows.size, source.num_members), sentinel, np.int64)
            counted = np.zeros((block_rows.size, counter.masks.size), bool)
            for i, (_, columns) in enumerate(members[part]):
                counted[i, columns] = True
            if counted.sum() * diff.shape[1] <= _DIRECT_CELLS:
                rank, near = _count_pairs_directly(diff, fixed.tolerance, counter.masks, counted, counter.flag_ks)
            else:
                outcome = counter.count(diff, upper, tolerance, needed=counted.any(axis=0))
                rank, near = outcome.rank, outcome.near
            counts.add(rank, near, counted, block_rows, keep, context.ks, first_row)


def _evaluate_mode(context: _Context, mode: str, weights: np.ndarray, masks: np.ndarray, *, stage: str,
                   all_ranks: bool, rank_subsets: int) -> ModeResult:
    start_time = time.perf_counter()
    source, topology = context.source, context.topology
    n, m = source.num_queries, source.num_members
    weight_error = STD_RELATIVE_ERROR if mode == STANDARDIZED else 0.0
    fixed = FixedPoint.for_mode(weights, source, weight_error=weight_error)
    singles = np.searchsorted(masks, 1 << np.arange(m, dtype=np.int64))
    keep = np.arange(masks.size) if all_ranks else singles
    counts = _sweep(context, fixed, masks, keep, stage=stage, label=f"mode {mode}")
    recall = topology.sum(counts.recall)
    near_all = topology.sum(counts.near_ties)
    undecided_pairs = int(topology.sum(np.array([counts.undecided], np.int64))[0])
    ranks = [topology.gather_rows(counts.ranks).T]
    pairs = topology.gather_rows(counts.near_pairs)
    pairs = [np.stack([keep[pairs[:, 0]], pairs[:, 1]], axis=1)]
    rank_rows = [keep]

    if not all_ranks and rank_subsets:
        # Ranks of the leading subsets, from a second pass over just those subsets.
        from engine import analysis

        # The leading subsets plus every other subset the analyses report
        # (best of each size, the ablation's alternatives), singles excluded.
        leading = analysis.reported_rows(recall, masks, context.source.num_members, top=rank_subsets)
        leading = leading[subsets.popcount(masks[leading]) > 1]
        if leading.size:
            extra = _sweep(context, fixed, masks[leading], np.arange(leading.size), stage=f"{stage}_ranks",
                           label=f"mode {mode}, ranks of {leading.size} leading subsets")
            if not np.array_equal(topology.sum(extra.recall), recall[leading]):
                raise RuntimeError(f"mode {mode}: the second pass over the leading subsets disagrees with the "
                                   "first; the similarity rows were not reproducible.")
            ranks.append(topology.gather_rows(extra.ranks).T)
            extra_pairs = topology.gather_rows(extra.near_pairs)
            pairs.append(np.stack([leading[extra_pairs[:, 0]], extra_pairs[:, 1]], axis=1))
            rank_rows.append(leading)

    rank_rows_all = np.concatenate(rank_rows)
    order = np.argsort(rank_rows_all, kind="stable")
    near_tie_pairs = np.concatenate(pairs).astype(np.int64).reshape(-1, 2)
    near_tie_pairs = near_tie_pairs[np.lexsort((near_tie_pairs[:, 0], near_tie_pairs[:, 1]))]
    seconds = time.perf_counter() - start_time
    logging.info("mode %s: %d subsets x %d queries in %.2f s; %d (query, subset) pairs (%.3f%%) "
                 "needed the whole gallery; %d near-tie decisions.",
                 mode, masks.size, n, seconds, undecided_pairs,
                 100.0 * undecided_pairs / max(1, masks.size * n), int(near_all.sum()))
    return ModeResult(name=mode, weights=weights, recall=recall,
                      ranks=np.ascontiguousarray(np.concatenate(ranks)[order]),
                      near_ties=near_all, near_tie_pairs=near_tie_pairs,
                      undecided_pairs=undecided_pairs, seconds=seconds, rank_masks=masks[rank_rows_all[order]])


def _quantize_bound(fixed: FixedPoint, upper: np.ndarray, diag_q: np.ndarray, num_members: int) -> np.ndarray:
    """Quantise bounds [b, M]: −inf (no non-candidate) to the sentinel, +inf (no bound) to a
    value that keeps every subset undecided."""
    finite = fixed.quantize(np.where(np.isfinite(upper), upper, 0.0)) - diag_q
    bound = np.where(np.isneginf(upper), _sentinel(num_members), finite)
    return np.where(np.isposinf(upper), INT32_MAX // num_members, np.maximum(bound, _sentinel(num_members)))


class _Progress:
    """Logs rows done, rate and time left about every 10 seconds."""

    def __init__(self, label: str, total: int, *, enabled: bool, unit_scale: int = 1, unit: str = "queries"):
        self.label, self.total, self.enabled, self.unit_scale, self.unit = label, total, enabled, unit_scale, unit
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
        logging.info("%s: %d/%d queries (%s %s/s), %.0f s elapsed, about %.0f s left",
                     self.label, self.done, self.total, f"{rate * self.unit_scale:,.0f}", self.unit, elapsed, left)
