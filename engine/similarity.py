"""Cosine-similarity blocks of M representations, computed on the fly.

A `SimilaritySource` yields, for a block of query rows, the M similarity
blocks Φ_k[rows, :] of shape [M, B, G], either from features (L2-normalised
rows, one float32 matrix product per representation) or from precomputed
similarity matrices. The full [M, N, G] stack is never materialised.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from engine import distributed, store

# Unit roundoff of float32.
F32_EPS = 2.0 ** -24


@jax.jit
def _normalize_rows(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


@jax.jit
def _similarity_block(left_block: jax.Array, right: jax.Array) -> jax.Array:
    # [B, D] x [G, D] -> [B, G] at full float32 precision.
    return jnp.matmul(left_block, right.T, precision=jax.lax.Precision.HIGHEST)


def _similarity_stack(lefts: tuple[jax.Array, ...], rights: tuple[jax.Array, ...]) -> jax.Array:
    """Compute the [M, B, G] similarities of M representations in one program (no separate stacking copy)."""
    return jnp.stack([_similarity_block(left, right) for left, right in zip(lefts, rights)])


@dataclasses.dataclass
class SimilaritySource:
    """Per-representation similarity rows for blocks of queries.

    Attributes:
      names: M representation names.
      num_queries: N.
      num_gallery: G.
      error_bounds: [M] bound on |Φ_float32 − Φ_exact| per entry, used to
        flag near-ties.
      value_bounds: [M] bound on |Φ| per entry (1 for cosine similarities).
      constant_members: bool [M], members known to have one value in every
        entry (their standard deviation is 0 exactly).

    From features, the normalised query rows stay in host memory (each tile
    sends its rows to the devices) and the gallery rows live on the devices.
    """

    names: tuple[str, ...]
    num_queries: int
    num_gallery: int
    error_bounds: np.ndarray
    value_bounds: np.ndarray
    constant_members: np.ndarray | None = None
    _left: tuple[np.ndarray, ...] | None = None
    _right: tuple[jax.Array, ...] | None = None
    _matrices: tuple[np.ndarray, ...] | None = None

    def __post_init__(self):
        if self.constant_members is None:
            self.constant_members = np.zeros(len(self.names), bool)

    @property
    def num_members(self) -> int:
        return len(self.names)

    def block(self, start: int, stop: int) -> jax.Array:
        """Return float32 [M, stop - start, G] similarities of query rows start..stop-1."""
        if self._matrices is not None:
            return jnp.stack([jnp.asarray(m[start:stop], dtype=jnp.float32) for m in self._matrices])
        return jnp.stack([
            _similarity_block(left[start:stop], right) for left, right in zip(self._left, self._right)])

    def select_queries(self, queries: np.ndarray) -> "SimilaritySource":
        """Return a source of the given queries against the same gallery, reordered.

        Query r of the new source is query `queries[r]` of this one. The
        gallery contains the same G items, with the match of `queries[r]` moved
        to position r (the contract that item i matches query i) and every
        other item after them in ascending order. Ranks therefore equal those
        of the same queries in this source.

        Args:
          queries: int [N'] distinct query indices in [0, N).
        """
        queries = np.asarray(queries, np.int64)
        if (queries.ndim != 1 or queries.size == 0 or queries.min() < 0 or queries.max() >= self.num_queries
                or np.unique(queries).size != queries.size):
            raise ValueError(f"queries must be distinct indices in [0, {self.num_queries}); got {queries.size} "
                             f"values in [{queries.min(initial=0)}, {queries.max(initial=0)}].")
        order = np.concatenate([queries, np.setdiff1d(np.arange(self.num_gallery), queries)])
        if self._matrices is not None:
            matrices = tuple(np.asarray(m)[queries][:, order] for m in self._matrices)
            return dataclasses.replace(self, num_queries=queries.size, _matrices=matrices)
        left = tuple(a[queries] for a in self._left)
        right = tuple(b[jnp.asarray(order)] for b in self._right)
        return dataclasses.replace(self, num_queries=queries.size, _left=left, _right=right)

    def tile_rows(self, indices: np.ndarray, topology: distributed.Topology, *, buffer: int | None = None
                  ) -> jax.Array:
        """Return float32 [M, len(indices), G] similarities, rows split over the local devices.

        Each device computes its own [M, len(indices) / devices, G] block in
        one program, so a row's values depend only on that block's row count
        (XLA gives every row the same values at a fixed shape, whatever the
        other rows are), never on the number of devices.

        With `buffer` (an index, e.g. 0 or 1 alternately), rows of
        precomputed matrices are staged in an aligned host buffer kept under
        that index. The next call with the same index overwrites it, and on
        CPU the returned array may share it, so the caller must wait for
        everything computed from the result before reusing the index. A
        reused buffer saves a fresh allocation and a second copy per tile,
        which took longer than the candidate kernel on XLA:CPU (jax 0.10).
        """
        indices = np.asarray(indices)
        if self._matrices is not None:
            rows = indices
            if indices.size and np.array_equal(indices, np.arange(indices[0], indices[0] + indices.size)):
                rows = slice(int(indices[0]), int(indices[0]) + indices.size)   # a view: one copy fewer
            shape = (self.num_members, indices.size, self.num_gallery)
            out = self._staging_buffer(shape, buffer) if buffer is not None else np.empty(shape, np.float32)
            for k, matrix in enumerate(self._matrices):
                out[k] = matrix[rows]
            return topology.shard(out, None, distributed.AXIS, None)
        right = self._replicated_right(topology)
        members = self.num_members
        row_spec = distributed.P(distributed.AXIS, None)
        kernel = topology.per_device(
            _similarity_stack, in_specs=((row_spec,) * members, (distributed.P(),) * members),
            out_specs=distributed.P(None, distributed.AXIS, None), key=("similarity", members))
        return kernel(tuple(topology.shard(left[indices], distributed.AXIS, None) for left in self._left), right)

    def _staging_buffer(self, shape: tuple[int, ...], index: int) -> np.ndarray:
        """Return float32 host buffer `index` of `shape`, 64-byte aligned (so that XLA:CPU can
        use it without a copy), kept for the next call with the same shape and index."""
        cache = self.__dict__.setdefault("_staging", {})
        key = (shape, index)
        if key not in cache:
            for other in [k for k in cache if k[0] != shape]:
                del cache[other]
            size = int(np.prod(shape)) * 4
            raw = np.empty(size + 64, np.uint8)
            offset = -raw.ctypes.data % 64
            cache[key] = raw[offset:offset + size].view(np.float32).reshape(shape)
        return cache[key]

    def _replicated_right(self, topology: distributed.Topology) -> tuple[jax.Array, ...]:
        """Return the gallery features replicated on the topology's devices (cached per mesh).

        A mesh over some of the devices of a cached mesh reuses that mesh's
        copies instead of copying the features again.
        """
        cache = self.__dict__.setdefault("_right_on_mesh", {})
        if topology.mesh not in cache:
            devices = set(topology.mesh.devices.flat)
            base = next((arrays for mesh, arrays in cache.items() if devices <= set(mesh.devices.flat)), None)
            if base is None:
                cache[topology.mesh] = tuple(jax.device_put(r, topology.sharding()) for r in self._right)
            else:
                cache[topology.mesh] = tuple(
                    jax.make_array_from_single_device_arrays(
                        a.shape, topology.sharding(), [s.data for s in a.addressable_shards if s.device in devices])
                    for a in base)
        return cache[topology.mesh]

    def digest(self) -> str:
        """Return a SHA-256 of the arrays behind the similarities (identifies the inputs)."""
        digest = hashlib.sha256()
        arrays = self._matrices if self._matrices is not None else self._left + self._right
        for array in arrays:
            array = np.ascontiguousarray(np.asarray(array))
            digest.update(f"{array.shape}{array.dtype}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()

    def bytes_per_query_row(self) -> int:
        return 4 * self.num_members * self.num_gallery

    def resident_bytes(self) -> int:
        """Device memory held for the whole run (normalised features)."""
        if self._left is None:
            return 0
        return sum(4 * (a.size + b.size) for a, b in zip(self._left, self._right))


def from_features(features: store.FeatureSet) -> SimilaritySource:
    """Build a source from validated features (float16 is computed in float32).

    The error bound per entry is (16 + sqrt(D)) float32 roundoffs.
    NOTE: this bound is empirical: on XLA:CPU the observed maximum error of a
    normalised float32 dot product against float64 was about 4.4 roundoffs
    for D from 16 to 2048 (normalisation dominates), so the bound leaves a
    margin of 4x at D = 16 and more at larger D.
    """
    left = tuple(np.asarray(_normalize_rows(jnp.asarray(np.asarray(a)))) for a in features.left)
    right = tuple(_normalize_rows(jnp.asarray(np.asarray(a))) for a in features.right)
    dims = np.array([a.shape[1] for a in features.left], dtype=np.float64)
    return SimilaritySource(
        names=features.names,
        num_queries=features.num_queries,
        num_gallery=features.num_gallery,
        error_bounds=(16.0 + np.sqrt(dims)) * F32_EPS,
        value_bounds=np.ones(len(features.names)),
        _left=left,
        _right=right,
    )


def from_matrices(names: Sequence[str], matrices: Sequence[np.ndarray]) -> SimilaritySource:
    """Build a source from precomputed similarity matrices [N, G] (any real values).

    Raises:
      ValueError: inconsistent shapes, G < N, or non-finite values.
    """
    names = tuple(str(n) for n in names)
    if not names or len(names) != len(matrices):
        raise ValueError(f"need one matrix per name; got {len(names)} names and {len(matrices)} matrices.")
    shape = None
    bounds, constant = [], []
    for name, matrix in zip(names, matrices):
        if matrix.ndim != 2:
            raise ValueError(f"similarity matrix {name!r}: expected [N, G], got shape {matrix.shape}.")
        if shape is None:
            shape = matrix.shape
        elif matrix.shape != shape:
            raise ValueError(f"similarity matrix {name!r} has shape {matrix.shape}, "
                             f"but {names[0]!r} has {shape}; all must match.")
        if matrix.shape[1] < matrix.shape[0] or matrix.shape[0] < 1:
            raise ValueError(f"similarity matrix {name!r} has shape {matrix.shape}; need 1 <= N <= G "
                             "(column i is the true match of row i).")
        # max and min propagate NaN and inf, so the bound is finite exactly when every entry is
        # (and no [N, G] temporary is allocated, unlike np.abs).
        largest, smallest = float(np.max(matrix)), float(np.min(matrix))
        bound = max(largest, -smallest)
        if not np.isfinite(bound):
            row, col = np.argwhere(~np.isfinite(matrix))[0]
            raise ValueError(f"similarity matrix {name!r} has a non-finite value at [{row}, {col}].")
        # Row sums of G values must stay finite in float32.
        limit = float(np.finfo(np.float32).max) / (4 * matrix.shape[1])
        if bound > limit:
            raise ValueError(f"similarity matrix {name!r} has values up to {bound:.3g}, too large for float32 "
                             f"sums over {matrix.shape[1]} gallery items (limit {limit:.3g}). Divide it by a "
                             "positive constant: that keeps its ranking, and standardised results do not change.")
        if 0 < bound < np.finfo(np.float32).tiny:
            raise ValueError(f"similarity matrix {name!r} has no value above {bound:.3g} in magnitude, below "
                             "float32's normal range, where XLA flushes values to zero. Multiply it by a positive "
                             "constant: that keeps its ranking, and standardised results do not change.")
        bounds.append(bound)
        constant.append(largest == smallest)
    value_bounds = np.maximum(np.array(bounds), np.finfo(np.float32).tiny)
    return SimilaritySource(
        names=names,
        num_queries=int(shape[0]),
        num_gallery=int(shape[1]),
        # Rounding the given values to float32 is the only error.
        error_bounds=value_bounds * F32_EPS * 2,
        value_bounds=value_bounds,
        constant_members=np.array(constant),
        _matrices=tuple(np.asarray(m) for m in matrices),
    )


@jax.jit
def row_moments(block: jax.Array, inverse_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return per-row mean and sum of squared deviations of a [M, B, G] block, both scaled.

    Each member's values are first multiplied by `inverse_scale` [M], powers
    of two from `moment_scales` (so exactly), which brings them near 1. Their
    squares then cannot overflow float32, and their deviations stay out of
    the subnormal range, which XLA:CPU (jax 0.10) flushes to zero.
    `combine_row_moments` undoes the scaling. Centring each row on its own mean before squaring
    avoids the cancellation of E[x^2] - E[x]^2 when the mean is large against
    the spread, as it is for cosine similarities of non-negative features.
    """
    # Scaling by a power of two commutes with the mean, and scaling inside the second
    # reduction keeps XLA from writing a scaled copy of the whole block.
    mean = block.mean(axis=2) * inverse_scale[:, None]
    centred = block * inverse_scale[:, None, None] - mean[:, :, None]
    return mean, (centred * centred).sum(axis=2)


# Exponents of the moment scales stay within float32's normal range.
_MAX_SCALE_EXPONENT = 126


def moment_scales(value_bounds: np.ndarray) -> np.ndarray:
    """Return float32 [M] inverse scales for `row_moments`: 2^-e with 2^e >= each value bound.

    Cosine similarities (bound 1) get 1, which leaves their moments unchanged.
    """
    bounds = np.maximum(np.asarray(value_bounds, np.float64), 2.0 ** -_MAX_SCALE_EXPONENT)
    exponents = np.clip(np.ceil(np.log2(bounds)), -_MAX_SCALE_EXPONENT, _MAX_SCALE_EXPONENT)
    return np.exp2(-exponents).astype(np.float32)


def combine_row_moments(means: np.ndarray, squared_deviations: np.ndarray, row_length: int,
                        inverse_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Combine per-row moments [M, N] into population mean and std [M] (float64).

    Uses the parallel-variance identity: total M2 = sum of row M2 + G * sum of
    (row mean - overall mean)^2. `inverse_scale` [M] undoes the scaling of
    `row_moments` (default 1).
    """
    means = np.asarray(means, dtype=np.float64)
    m2 = np.asarray(squared_deviations, dtype=np.float64)
    if inverse_scale is not None:
        factor = np.asarray(inverse_scale, np.float64)[:, None]
        means, m2 = means / factor, m2 / factor ** 2
    mean = means.mean(axis=1)
    total_m2 = m2.sum(axis=1) + row_length * ((means - mean[:, None]) ** 2).sum(axis=1)
    count = means.shape[1] * row_length
    return mean, np.sqrt(np.maximum(total_m2 / count, 0.0))


def standardization_weights(std: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Return 1 / std per representation.

    A constant similarity matrix (std 0, e.g. N = G = 1) has no defined
    standardised values; it gets weight 0, so it contributes nothing to a
    subset's score, and a warning is logged.
    """
    std = np.asarray(std, dtype=np.float64)
    if not np.all(np.isfinite(std)):
        raise ValueError(f"non-finite similarity standard deviation {std} for {list(names)}.")
    constant = [names[k] for k in range(len(std)) if std[k] <= 0]
    if constant:
        logging.warning("standardized mode: the similarity matrices of %s are constant (standard deviation 0); "
                        "they get weight 0.", constant)
    return np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
