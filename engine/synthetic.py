"""Seeded synthetic retrieval problems for benchmarks and tests.

Each pair i has a latent vector z_i. Representation k observes its own random
selection of latent dimensions through a random projection. Both sides get
noise, part of it shared by all representations of an image (errors that no
combination can average away) and part independent, plus a shared offset so
that cosine similarities have a positive mean, as for the non-negative
features of real networks.
"""

from __future__ import annotations

import numpy as np

from engine import store


def make_features(
    *,
    num_queries: int,
    num_gallery: int | None = None,
    num_members: int,
    dim: int,
    latent_dim: int = 64,
    dims_per_member: int = 40,
    noise: float = 1.55,
    shared_noise: float = 0.8,
    offset: float = 0.5,
    dtype: np.dtype = np.float32,
    seed: int = 0,
) -> store.FeatureSet:
    """Return a FeatureSet with N queries, G gallery items and M representations of size D.

    Args:
      num_queries: N.
      num_gallery: G >= N (default N); rows N..G−1 of right are distractors.
      num_members: M.
      dim: D, the same for every representation.
      latent_dim: size of each pair's latent vector.
      dims_per_member: latent dimensions each representation observes.
      noise: standard deviation of the per-entry noise; the signal has unit
        variance per entry. Larger is harder; the default gives
        single-representation recall@1 of about 4% at N = G = 6,016 and
        D = 1,024, the regime of the Totally-Looks-Like benchmark.
      shared_noise: fraction of the noise variance shared by all
        representations of the same image.
      offset: size of a shared direction that makes similarities positive on average.
      dtype: float32 or float16.
      seed: random seed.
    """
    num_gallery = num_queries if num_gallery is None else num_gallery
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((num_gallery, latent_dim)).astype(np.float32)
    shared_left = rng.standard_normal((num_queries, latent_dim)).astype(np.float32)
    shared_right = rng.standard_normal((num_gallery, latent_dim)).astype(np.float32)
    own = noise * np.sqrt(1.0 - shared_noise)
    common = noise * np.sqrt(shared_noise)
    left, right = [], []
    for _ in range(num_members):
        seen = rng.choice(latent_dim, size=min(dims_per_member, latent_dim), replace=False)
        projection = rng.standard_normal((seen.size, dim)).astype(np.float32) / np.sqrt(seen.size)
        shift = offset * rng.standard_normal(dim).astype(np.float32)
        left_k = ((latent[:num_queries, seen] + common * shared_left[:, seen]) @ projection
                  + own * rng.standard_normal((num_queries, dim)).astype(np.float32) + shift)
        right_k = ((latent[:, seen] + common * shared_right[:, seen]) @ projection
                   + own * rng.standard_normal((num_gallery, dim)).astype(np.float32) + shift)
        left.append(left_k.astype(dtype))
        right.append(right_k.astype(dtype))
    return store.features_from_arrays([f"rep{k:02d}" for k in range(num_members)], left, right)
