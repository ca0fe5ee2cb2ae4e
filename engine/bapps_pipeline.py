"""Channel profiles and baseline distances of a BAPPS split, cached per category and net.

The pipeline takes the split's file lists, an image loader and, per net, a
factory for a function that maps images to tap activations. It never imports
torch: the extractor arrives as a callable, built only when some category
misses the cache, so a run whose profiles are all cached never touches PyTorch.

For 2AFC each category gets `profile0` and `profile1` [T, C] per net (pairs
(ref, p0) and (ref, p1)) and `d0`, `d1` [T] per baseline. For JND it gets
`profile` [T, C] per net (pair (p0, p1)) and `d` [T] per baseline.

Retrieval representations arrive the same way, as an `EmbeddingRunner` whose
embedding function is built on first use. Their embeddings of every image
(`ref`, `p0`, `p1` or `p0`, `p1`, [T, D] each) are cached per category and
representation. The engine turns them into the cosine distance
1 - cos(f(a), f(b)), stored beside the baselines under the representation's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from tqdm import tqdm

from engine import image_metrics, lpips, profile_cache

# Changing how profiles or baselines are computed must change this, so that
# cache entries written by older code are not reused.
PIPELINE_VERSION = 1
# "ssim" is DSSIM = (1 - SSIM) / 2 in L*a*b*, the colour space the `lpips`
# evaluation script uses by default for both baselines.
BASELINES = ("l2-lab", "l2-rgb", "ssim", "ssim-rgb")

Extract = Callable[[np.ndarray], Sequence[np.ndarray]]
Embed = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class NetRunner:
    """The settings and extractor factory of one distance net, as the pipeline uses them.

    Attributes:
      name: the net's name, used in metric names ("alex").
      channels: [L] channel count per tap.
      fingerprint: every setting that changes the activations (weights, version, taps).
      make_extract: returns a function from images [B, H, W, 3] in [-1, 1]
        to L activations [B, C_l, H_l, W_l]; `compute_split` calls it once,
        at the first category whose profiles are not cached.
    """

    name: str
    channels: tuple[int, ...]
    fingerprint: Mapping[str, Any]
    make_extract: Callable[[], Extract]


@dataclasses.dataclass(frozen=True)
class EmbeddingRunner:
    """One retrieval representation used as a distance: its name, fingerprint and embedding factory.

    Attributes:
      name: the metric name, the representation's registry name ("effnet_lite0").
      fingerprint: every setting that changes the embeddings (the representation's fingerprint).
      make_embed: returns a function from images [B, H, W, 3] in [-1, 1] to
        features [B, D]; `compute_split` calls it once, at the first category
        whose embeddings are not cached.
    """

    name: str
    fingerprint: Mapping[str, Any]
    make_embed: Callable[[], Embed]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return 1 - cos(a_t, b_t) per row, float64 [T], for features a, b [T, D].

    A zero vector has no direction; its cosine with anything is taken as 0
    (distance 1). The cosine is clipped to [-1, 1], so that rounding cannot put
    a distance outside [0, 2].
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("td,td->t", a, b)
    cosine = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return 1.0 - np.clip(cosine, -1.0, 1.0)


def embedding_distances(task: str, embeddings: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return {"d0", "d1"} (2AFC: ref vs p0, ref vs p1) or {"d"} (JND: p0 vs p1), [T] each."""
    if task == "2afc":
        return {"d0": cosine_distance(embeddings["ref"], embeddings["p0"]),
                "d1": cosine_distance(embeddings["ref"], embeddings["p1"])}
    return {"d": cosine_distance(embeddings["p0"], embeddings["p1"])}


@dataclasses.dataclass
class CategoryArrays:
    """The arrays of one category.

    Attributes:
      name: category name.
      stems: [T] file stems.
      labels: [T] judge (2AFC) or same (JND).
      profiles: net -> {"profile0", "profile1"} (2AFC) or {"profile"} (JND), [T, C] each.
      baselines: metric -> {"d0", "d1"} (2AFC) or {"d"} (JND), [T] each; the
        baselines first, then one cosine distance per retrieval representation.
    """

    name: str
    stems: tuple[str, ...]
    labels: np.ndarray
    profiles: dict[str, dict[str, np.ndarray]]
    baselines: dict[str, dict[str, np.ndarray]]


def compute_split(
    split: Any,
    nets: Sequence[NetRunner],
    *,
    image_loader: Callable[[Sequence[str]], np.ndarray],
    load_size: int,
    cache_dir: str | None,
    batch_size: int = 50,
    with_baselines: bool = True,
    embedders: Sequence[EmbeddingRunner] = (),
) -> tuple[list[CategoryArrays], dict[str, Any]]:
    """Return the arrays of every category of `split`, from the cache where valid.

    Args:
      split: a split from `extractors.bapps.read_split` (task, split, categories
        with name, stems, images, labels, fingerprint).
      nets: the distance nets.
      image_loader: paths -> float32 [B, H, W, 3] in [-1, 1].
      load_size: the loader's shorter side, part of every fingerprint.
      cache_dir: the cache root; None disables caching.
      batch_size: images per forward pass.
      with_baselines: also compute the L2 (Lab, RGB) and SSIM distances.
      embedders: retrieval representations whose cosine distances join the baselines.

    Returns:
      (arrays per category, cache report: entries loaded, computed, invalid).
    """
    extracts: dict[str, Extract] = {}
    embeds: dict[str, Embed] = {}
    report = {"loaded": [], "computed": []}
    results = []
    for category in split.categories:
        where = (split.task, split.split, category.name)
        base = {"dataset": category.fingerprint, "load_size": load_size, "pipeline": PIPELINE_VERSION}
        arrays = CategoryArrays(category.name, category.stems, category.labels, {}, {})
        todo_nets = []
        for net in nets:
            fingerprint = {**base, "net": dict(net.fingerprint)}
            cached = profile_cache.load(cache_dir, where, net.name, fingerprint) if cache_dir else None
            if cached is None:
                todo_nets.append((net, fingerprint))
            else:
                arrays.profiles[net.name] = cached
                report["loaded"].append(f"{'/'.join(where)}/{net.name}")
        baseline_fingerprint = {**base, "metrics": list(BASELINES)}
        need_baselines = False
        if with_baselines:
            cached = profile_cache.load(cache_dir, where, "baselines", baseline_fingerprint) if cache_dir else None
            if cached is None:
                need_baselines = True
            else:
                arrays.baselines = _unflatten(cached)
                report["loaded"].append(f"{'/'.join(where)}/baselines")
        if todo_nets or need_baselines:
            for net, _ in todo_nets:
                if net.name not in extracts:
                    extracts[net.name] = net.make_extract()
            profiles, baselines = _compute_category(
                split.task, category, [n for n, _ in todo_nets], extracts, image_loader, batch_size, need_baselines)
            for net, fingerprint in todo_nets:
                arrays.profiles[net.name] = profiles[net.name]
                if cache_dir:
                    profile_cache.save(cache_dir, where, net.name, fingerprint, profiles[net.name])
                report["computed"].append(f"{'/'.join(where)}/{net.name}")
            if need_baselines:
                arrays.baselines = baselines
                if cache_dir:
                    profile_cache.save(cache_dir, where, "baselines", baseline_fingerprint, _flatten(baselines))
                report["computed"].append(f"{'/'.join(where)}/baselines")
        for embedder in embedders:
            embeddings = _category_embeddings(split.task, category, embedder, embeds, base, where, image_loader,
                                              cache_dir, batch_size, report)
            arrays.baselines[embedder.name] = embedding_distances(split.task, embeddings)
        results.append(arrays)
    logging.info("profiles: %d cache entries loaded, %d computed", len(report["loaded"]), len(report["computed"]))
    return results, report


def _category_embeddings(task, category, embedder, embeds, base, where, image_loader, cache_dir, batch_size,
                         report) -> dict[str, np.ndarray]:
    kind = f"embedding-{embedder.name}"
    fingerprint = {**base, "representation": dict(embedder.fingerprint)}
    cached = profile_cache.load(cache_dir, where, kind, fingerprint) if cache_dir else None
    if cached is not None:
        report["loaded"].append(f"{'/'.join(where)}/{kind}")
        return cached
    if embedder.name not in embeds:
        embeds[embedder.name] = embedder.make_embed()
    folders = ("ref", "p0", "p1") if task == "2afc" else ("p0", "p1")
    parts: dict[str, list[np.ndarray]] = {f: [] for f in folders}
    count = len(category.stems)
    for start in tqdm(range(0, count, batch_size), desc=f"{task}/{category.name}/{embedder.name}", unit="batch",
                      leave=False):
        stop = min(start + batch_size, count)
        for folder in folders:
            features = np.asarray(embeds[embedder.name](image_loader(category.images[folder][start:stop])),
                                  np.float32)
            if features.ndim != 2 or features.shape[0] != stop - start:
                raise ValueError(f"{embedder.name}: the extractor returned features of shape {features.shape} "
                                 f"for {stop - start} images of {category.name}/{folder}; expected [B, D].")
            parts[folder].append(features)
    embeddings = {folder: np.concatenate(chunks) for folder, chunks in parts.items()}
    if cache_dir:
        profile_cache.save(cache_dir, where, kind, fingerprint, embeddings)
    report["computed"].append(f"{'/'.join(where)}/{kind}")
    return embeddings


def _flatten(baselines: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{metric}.{side}": values for metric, sides in baselines.items() for side, values in sides.items()}


def _unflatten(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    nested: dict[str, dict[str, np.ndarray]] = {}
    for key, values in arrays.items():
        metric, _, side = key.rpartition(".")
        nested.setdefault(metric, {})[side] = values
    return nested


def _compute_category(task, category, nets, extracts, image_loader, batch_size, need_baselines):
    folders = ("ref", "p0", "p1") if task == "2afc" else ("p0", "p1")
    sides = ("profile0", "profile1") if task == "2afc" else ("profile",)
    parts = {net.name: {side: [] for side in sides} for net in nets}
    baseline_parts: dict[str, dict[str, list[np.ndarray]]] = {}
    count = len(category.stems)
    batches = range(0, count, batch_size)
    for start in tqdm(batches, desc=f"{task}/{category.name}", unit="batch", leave=False):
        stop = min(start + batch_size, count)
        images = {f: image_loader(category.images[f][start:stop]) for f in folders}
        for net in nets:
            acts = [extracts[net.name](images[f]) for f in folders]
            for side, profile in zip(sides, _reduce(task, acts, batch_size)):
                parts[net.name][side].append(profile)
        if need_baselines:
            for metric, values in _baseline_batch(task, images).items():
                for side, value in values.items():
                    baseline_parts.setdefault(metric, {}).setdefault(side, []).append(value)
    profiles = {name: {side: np.concatenate(chunks) for side, chunks in by_side.items()}
                for name, by_side in parts.items()}
    baselines = {metric: {side: np.concatenate(chunks).astype(np.float64) for side, chunks in by_side.items()}
                 for metric, by_side in baseline_parts.items()}
    return profiles, baselines


def _reduce(task: str, acts: list[Sequence[np.ndarray]], batch_size: int) -> tuple[np.ndarray, ...]:
    # Pad a short last batch to the full batch size so the jitted reduction
    # compiles once per net, not once per category.
    count = acts[0][0].shape[0]
    if count < batch_size:
        pad = lambda a: np.concatenate([a, np.zeros((batch_size - count, *a.shape[1:]), a.dtype)])  # noqa: E731
        acts = [[pad(a) for a in image_acts] for image_acts in acts]
    if task == "2afc":
        profiles = lpips.triplet_profiles(*acts)
    else:
        profiles = (lpips.channel_profile(*acts),)
    return tuple(p[:count] for p in profiles)


def _baseline_batch(task: str, images: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    pairs = {"d0": ("ref", "p0"), "d1": ("ref", "p1")} if task == "2afc" else {"d": ("p0", "p1")}
    values: dict[str, dict[str, np.ndarray]] = {metric: {} for metric in BASELINES}
    for side, (a, b) in pairs.items():
        values["l2-lab"][side] = np.asarray(image_metrics.l2_distance(images[a], images[b], colorspace="lab"))
        values["l2-rgb"][side] = np.asarray(image_metrics.l2_distance(images[a], images[b], colorspace="rgb"))
        values["ssim"][side] = np.asarray(image_metrics.dssim(images[a], images[b], colorspace="lab"))
        values["ssim-rgb"][side] = np.asarray(image_metrics.dssim(images[a], images[b], colorspace="rgb"))
    return values
