"""Fit non-negative per-channel weights of the LPIPS distance on 2AFC judgments.

Shapes: T triplets, C channels (all taps concatenated).

Model: a weighting w >= 0 gives d = profile @ w, and the probability that
people choose p1 is sigmoid((profile0 - profile1) @ w), so p1 is favoured
when d1 < d0. The loss is the binary cross-entropy against h plus l1 * sum(w)
in standardised units (below). There is no separate temperature because the
scale of w is the temperature. A free temperature would let the L1 term
shrink w to zero while the temperature grows, so the penalty would select
nothing.

Standardisation: channel c is divided by s_c, the root mean square of
(profile0 - profile1)[:, c] over the training triplets, so one l1 value
weighs every channel alike, as lasso packages do by default. The fit runs on
v = w * s, and w = v / s is returned.

Solver: FISTA (accelerated proximal gradient) on the full batch with step
1 / L, L an upper estimate of the loss gradient's Lipschitz constant from a
seeded power iteration. The proximal step max(v - step * l1, 0) keeps every
weight >= 0 and sets weights to exact zeros. The result depends only on the
data, `steps`, `learning_rate` and `seed`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from engine import lpips as lpips_lib

__all__ = ["ChannelFit", "fit_channel_weights", "format_fit_table", "nonzero_per_tap"]

_HIGHEST = jax.lax.Precision.HIGHEST
POWER_ITERATIONS = 50
LIPSCHITZ_SAFETY = 1.5  # the power iteration approaches the largest eigenvalue from below


@dataclasses.dataclass(frozen=True)
class ChannelFit:
    """Fitted channel weights and how the fit went.

    Attributes:
      weights: float32 `[C]`, w >= 0 in the profile's units; d = profile @ w.
      channel_scale: float32 `[C]`, s, the RMS of profile0 - profile1 per
        channel (1 where a channel is always zero).
      l1: penalty per unit of standardised weight.
      steps: iterations run.
      learning_rate: step size used (in standardised units).
      loss: float32 `[steps]` objective (cross-entropy plus penalty) after each step.
      cross_entropy: final mean binary cross-entropy on the training triplets.
      num_nonzero: channels with a non-zero weight.
    """

    weights: np.ndarray
    channel_scale: np.ndarray
    l1: float
    steps: int
    learning_rate: float
    loss: np.ndarray
    cross_entropy: float
    num_nonzero: int

    def to_dict(self, *, include_weights: bool = False) -> dict[str, Any]:
        """Return a JSON-serialisable summary; the `[C]` weights only when `include_weights`."""
        summary = {
            "l1": self.l1,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "final_objective": float(self.loss[-1]) if self.loss.size else None,
            "cross_entropy": self.cross_entropy,
            "num_nonzero": self.num_nonzero,
            "num_channels": int(self.weights.shape[0]),
        }
        if include_weights:
            summary["weights"] = self.weights.tolist()
        return summary


def _bce(logits: jax.Array, judge: jax.Array) -> jax.Array:
    # Cross-entropy of sigmoid(logits) against soft labels, stable for any logit.
    return jnp.mean(jax.nn.softplus(logits) - judge * logits)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fista(features: jax.Array, judge: jax.Array, l1: float, step: float, steps: int,
           init: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Run `steps` FISTA iterations; return the weights `[C]` and the objective after each step `[steps]`."""

    def objective(v):
        return _bce(jnp.dot(features, v, precision=_HIGHEST), judge) + l1 * jnp.sum(v)

    gradient = jax.grad(lambda v: _bce(jnp.dot(features, v, precision=_HIGHEST), judge))

    def body(state, _):
        v, y, momentum = state
        v_next = jnp.maximum(y - step * (gradient(y) + l1), 0.0)
        momentum_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * momentum * momentum))
        y_next = v_next + ((momentum - 1.0) / momentum_next) * (v_next - v)
        return (v_next, y_next, momentum_next), objective(v_next)

    (v, _, _), losses = jax.lax.scan(body, (init, init, jnp.float32(1.0)), None, length=steps)
    return v, losses


@jax.jit
def _power_step(features: jax.Array, vector: jax.Array) -> tuple[jax.Array, jax.Array]:
    product = jnp.dot(features.T, jnp.dot(features, vector, precision=_HIGHEST), precision=_HIGHEST)
    norm = jnp.linalg.norm(product)
    return product / norm, norm


def _lipschitz(features: jax.Array, seed: int) -> float:
    """Estimate the Lipschitz constant of the mean cross-entropy's gradient: max eig(X^T X) / (4 T)."""
    vector = jax.random.normal(jax.random.PRNGKey(seed), (features.shape[1],), dtype=jnp.float32)
    vector = vector / jnp.linalg.norm(vector)
    norm = jnp.float32(0.0)
    for _ in range(POWER_ITERATIONS):
        vector, norm = _power_step(features, vector)
    return float(norm) / (4.0 * features.shape[0])


def fit_channel_weights(profile0: Any, profile1: Any, judge: Any, *, l1: float = 0.0, steps: int = 500,
                        learning_rate: float | None = None, seed: int = 0) -> ChannelFit:
    """Fit non-negative channel weights on 2AFC triplets, optionally with an L1 penalty.

    Args:
      profile0: `[T, C]` channel profile of (reference, p0).
      profile1: `[T, C]` channel profile of (reference, p1).
      judge: `[T]` fraction of people who chose p1.
      l1: L1 penalty per unit of standardised weight (0 for none); larger
        values give more exact zeros.
      steps: FISTA iterations.
      learning_rate: step size in standardised units; by default 1 / L from
        a power iteration, which guarantees the objective converges.
      seed: seed of the power iteration's start vector.

    Returns:
      `ChannelFit` with the weights in the profile's units.
    """
    # float32 throughout: one training profile is about 1 GB (151k triplets x 1,472 AlexNet channels x 4 bytes).
    profile0 = np.asarray(profile0, dtype=np.float32)
    profile1 = np.asarray(profile1, dtype=np.float32)
    judge = np.asarray(judge, dtype=np.float64)
    if profile0.ndim != 2 or profile0.shape != profile1.shape or judge.shape != (profile0.shape[0],):
        raise ValueError(f"expected profile0 and profile1 [T, C] and judge [T], "
                         f"got {profile0.shape}, {profile1.shape} and {judge.shape}.")
    if not (np.all(np.isfinite(profile0)) and np.all(np.isfinite(profile1))):
        raise ValueError("profiles contain non-finite values; recompute them before fitting.")
    if np.any((judge < 0.0) | (judge > 1.0)):
        raise ValueError(f"judge must be in [0, 1], got values in [{judge.min()}, {judge.max()}].")
    if l1 < 0.0 or steps < 1:
        raise ValueError(f"l1 must be >= 0 and steps >= 1, got l1={l1} and steps={steps}.")

    difference = profile0 - profile1
    scale = np.sqrt(np.mean(np.square(difference), axis=0, dtype=np.float64))
    scale[scale == 0.0] = 1.0
    difference /= scale.astype(np.float32)
    features = jnp.asarray(difference)
    del difference
    judge_device = jnp.asarray(judge, dtype=jnp.float32)

    if learning_rate is None:
        learning_rate = 1.0 / (LIPSCHITZ_SAFETY * _lipschitz(features, seed))
    if not learning_rate > 0.0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}; the profiles may be all zero.")

    init = jnp.zeros(profile0.shape[1], dtype=jnp.float32)
    scaled, losses = _fista(features, judge_device, jnp.float32(l1), jnp.float32(learning_rate), steps, init)
    scaled = np.asarray(scaled)
    weights = (scaled / scale).astype(np.float32)
    cross_entropy = float(_bce(jnp.dot(features, jnp.asarray(scaled), precision=_HIGHEST), judge_device))
    num_nonzero = int(np.count_nonzero(weights))
    logging.info("Fitted %d channel weights (l1=%g, %d steps): %d non-zero, cross-entropy %.5f.",
                 weights.shape[0], l1, steps, num_nonzero, cross_entropy)
    return ChannelFit(weights=weights, channel_scale=scale.astype(np.float32), l1=float(l1), steps=steps,
                      learning_rate=float(learning_rate), loss=np.asarray(losses), cross_entropy=cross_entropy,
                      num_nonzero=num_nonzero)


def nonzero_per_tap(weights: Any, channels: Sequence[int]) -> list[int]:
    """Return the number of non-zero weights in each tap's slice of `weights` `[C]`."""
    weights = np.asarray(weights)
    if sum(channels) != weights.shape[0]:
        raise ValueError(f"channels {list(channels)} sum to {sum(channels)}, but weights has {weights.shape[0]}.")
    return [int(np.count_nonzero(weights[tap])) for tap in lpips_lib.tap_slices(channels)]


def format_fit_table(rows: Sequence[dict[str, Any]], category_names: Sequence[str], *, digits: int = 2) -> str:
    """Render fitted weightings as Markdown, one row per fit.

    Args:
      rows: dicts with "label" (e.g. "alex, l1=1e-3"), "fit" (a `ChannelFit`)
        and "scores" (the validation `CategoryScores` of its distance).
      category_names: columns, in order.
    """
    header = ["weighting", "non-zero weights", *category_names, "mean of categories", "pooled over triplets"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        fit, result = row["fit"], row["scores"]
        cells = [row["label"], f"{fit.num_nonzero} / {fit.weights.shape[0]}",
                 *(f"{result.score(name):.{digits}f}" for name in category_names),
                 f"{result.mean_of_categories:.{digits}f}", f"{result.pooled:.{digits}f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
