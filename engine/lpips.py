"""LPIPS channel profiles and the distances computed from them.

The LPIPS distance between two images, for one net with L taps, is

    d = sum_l mean_{h,w} sum_c w_{l,c} (f̂_a - f̂_b)^2_{l,c,h,w},
    f̂ = f / (sqrt(sum_c f^2) + 1e-10)    (unit norm over channels, epsilon outside the root)

Because the weights do not depend on the position, the spatial mean moves
inside: d = profile @ w with the channel profile

    profile_{(l,c)} = mean_{h,w} (f̂_a - f̂_b)^2_{l,c,h,w},    [T, C], C = sum_l C_l.

One extraction therefore serves every weighting: the published calibration
("-lin"), ones (the uncalibrated baseline), one tap at a time, or a fitted
weighting. Shapes: T pairs, C channels over all taps, L taps; activations are
channels-first, [T, C_l, H_l, W_l], as PyTorch produces them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-10


def _unit_normalise(activation: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(activation * activation, axis=1, keepdims=True))
    return activation / (norm + EPSILON)


def _tap_profile(a: jax.Array, b: jax.Array) -> jax.Array:
    diff = _unit_normalise(a) - _unit_normalise(b)
    return jnp.mean(diff * diff, axis=(2, 3))


@jax.jit
def _profile_core(acts_a: tuple[jax.Array, ...], acts_b: tuple[jax.Array, ...]) -> jax.Array:
    return jnp.concatenate([_tap_profile(a, b) for a, b in zip(acts_a, acts_b)], axis=1)


@jax.jit
def _triplet_core(acts_ref, acts_p0, acts_p1) -> tuple[jax.Array, jax.Array]:
    profiles0, profiles1 = [], []
    for ref, p0, p1 in zip(acts_ref, acts_p0, acts_p1):
        ref_hat = _unit_normalise(ref)
        d0 = ref_hat - _unit_normalise(p0)
        d1 = ref_hat - _unit_normalise(p1)
        profiles0.append(jnp.mean(d0 * d0, axis=(2, 3)))
        profiles1.append(jnp.mean(d1 * d1, axis=(2, 3)))
    return jnp.concatenate(profiles0, axis=1), jnp.concatenate(profiles1, axis=1)


def _check_activations(*groups: Sequence[np.ndarray]) -> None:
    lengths = {len(group) for group in groups}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every image needs the same non-zero number of taps, got {sorted(lengths)}.")
    for taps in zip(*groups):
        shapes = {tuple(np.shape(a)) for a in taps}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"tap activations must share one shape [T, C_l, H_l, W_l], got {sorted(shapes)}.")


def channel_profile(acts_a: Sequence[np.ndarray], acts_b: Sequence[np.ndarray]) -> np.ndarray:
    """Reduce pairs of images to their channel profiles.

    Args:
      acts_a: L activations [T, C_l, H_l, W_l] of the first image of each pair.
      acts_b: the same for the second image.

    Returns:
      float32 [T, C], the taps' channels concatenated in tap order.
    """
    _check_activations(acts_a, acts_b)
    return np.asarray(_profile_core(tuple(map(jnp.asarray, acts_a)), tuple(map(jnp.asarray, acts_b))))


def triplet_profiles(
    acts_ref: Sequence[np.ndarray],
    acts_p0: Sequence[np.ndarray],
    acts_p1: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Return the profiles of (ref, p0) and (ref, p1), each float32 [T, C], normalising ref once."""
    _check_activations(acts_ref, acts_p0, acts_p1)
    as_jax = lambda acts: tuple(map(jnp.asarray, acts))  # noqa: E731
    profile0, profile1 = _triplet_core(as_jax(acts_ref), as_jax(acts_p0), as_jax(acts_p1))
    return np.asarray(profile0), np.asarray(profile1)


def channel_profile_reference(acts_a: Sequence[np.ndarray], acts_b: Sequence[np.ndarray]) -> np.ndarray:
    """Float64 numpy brute force of `channel_profile`, one pair and one channel at a time."""
    columns = []
    for a, b in zip(acts_a, acts_b):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        tap = np.zeros(a.shape[:2])
        for t in range(a.shape[0]):
            a_hat = a[t] / (np.sqrt((a[t] ** 2).sum(axis=0)) + EPSILON)
            b_hat = b[t] / (np.sqrt((b[t] ** 2).sum(axis=0)) + EPSILON)
            for c in range(a.shape[1]):
                tap[t, c] = ((a_hat[c] - b_hat[c]) ** 2).mean()
        columns.append(tap)
    return np.concatenate(columns, axis=1)


def tap_slices(channels: Sequence[int]) -> list[slice]:
    """Return the column slice of each tap in a profile with per-tap channel counts `channels`."""
    bounds = np.concatenate([[0], np.cumsum(channels)]).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def calibrated_weights(linear_weights: Sequence[np.ndarray], channels: Sequence[int]) -> np.ndarray:
    """Concatenate per-tap calibration weights ([C_l] each) into w [C], checking their sizes."""
    sizes = [int(np.size(w)) for w in linear_weights]
    if sizes != list(channels):
        raise ValueError(f"calibration weights have {sizes} channels per tap, the net has {list(channels)}.")
    return np.concatenate([np.asarray(w, np.float32).reshape(-1) for w in linear_weights])


def uncalibrated_weights(channels: Sequence[int]) -> np.ndarray:
    """Return ones [C]: the uncalibrated LPIPS baseline (`lpips.LPIPS(lpips=False)`)."""
    return np.ones(sum(channels), np.float32)


def single_tap_weights(channels: Sequence[int], tap: int) -> np.ndarray:
    """Return w [C] with ones on tap `tap`'s channels and zeros elsewhere."""
    if not 0 <= tap < len(channels):
        raise ValueError(f"tap {tap} is out of range [0, {len(channels) - 1}].")
    weights = np.zeros(sum(channels), np.float32)
    weights[tap_slices(channels)[tap]] = 1.0
    return weights


def metric_weightings(
    net: str,
    channels: Sequence[int],
    linear_weights: Sequence[np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Return the named weightings of one net: NET-lin, NET, and NET-l0 .. NET-l{L-1}.

    NET-lin is left out when `linear_weights` is None.
    """
    weightings = {}
    if linear_weights is not None:
        weightings[f"{net}-lin"] = calibrated_weights(linear_weights, channels)
    weightings[net] = uncalibrated_weights(channels)
    for tap in range(len(channels)):
        weightings[f"{net}-l{tap}"] = single_tap_weights(channels, tap)
    return weightings


def distance(profile: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return the distances profile @ weights, [T] for one weighting [C] or [T, K] for [C, K].

    The product runs in float64 so that its rounding stays far below the
    profile's float32 precision.
    """
    profile = np.asarray(profile)
    weights = np.asarray(weights)
    if profile.ndim != 2 or weights.shape[0] != profile.shape[1]:
        raise ValueError(f"profile [T, C] = {profile.shape} does not fit weights {weights.shape}.")
    return profile.astype(np.float64) @ weights.astype(np.float64)


def _upsample_bilinear(maps: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    # Half-pixel centres; when upsampling this equals torch's bilinear
    # interpolation with align_corners=False, which the reference uses.
    return jax.image.resize(maps, (maps.shape[0], *out_hw), method="bilinear", antialias=False)


def spatial_distance_map(
    acts_a: Sequence[np.ndarray],
    acts_b: Sequence[np.ndarray],
    out_hw: tuple[int, int],
    linear_weights: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Return the LPIPS distance map, [T, H, W], as `lpips.LPIPS(spatial=True)` computes it.

    Per tap, the (weighted) channel sum of the squared difference of
    unit-normalised activations is upsampled bilinearly to `out_hw`, and the
    taps are summed. Its spatial mean differs from the scalar distance only
    by interpolation.

    Args:
      acts_a, acts_b: L activations [T, C_l, H_l, W_l].
      out_hw: (H, W) of the map, normally the input image size.
      linear_weights: per-tap weights [C_l]; None sums channels unweighted.
    """
    _check_activations(acts_a, acts_b)
    as_jax = lambda arrays: tuple(jnp.asarray(a, jnp.float32) for a in arrays)  # noqa: E731
    weights = None if linear_weights is None else as_jax(linear_weights)
    return np.asarray(_spatial_core(as_jax(acts_a), as_jax(acts_b), weights, tuple(out_hw)))


@functools.partial(jax.jit, static_argnames=("out_hw",))
def _spatial_core(acts_a, acts_b, linear_weights, out_hw):
    total = jnp.zeros((acts_a[0].shape[0], *out_hw), jnp.float32)
    for tap, (a, b) in enumerate(zip(acts_a, acts_b)):
        diff = _unit_normalise(a) - _unit_normalise(b)
        squared = diff * diff
        if linear_weights is not None:
            squared = squared * linear_weights[tap][None, :, None, None]
        total = total + _upsample_bilinear(jnp.sum(squared, axis=1), out_hw)
    return total
