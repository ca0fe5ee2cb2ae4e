r"""Speed of the subset search against the loop a researcher writes first.

On synthetic features (defaults: N = G = 6,016 queries, M = 11
representations, D = 1,024, the size of the Totally-Looks-Like experiment),
in one run:

  (a) the naive loop: for each subset, sum the members' precomputed [N, G]
      cosine-similarity matrices and take each row's argmax; recall@1 only,
      one mode. Timed on a sample of subsets stratified by size and
      extrapolated to all 2^M - 1 subsets.
  (b) the engine: every subset in both modes (raw and standardized) with
      K = 1, 5, 10, JIT compilation included, twice: from the same
      precomputed matrices the naive loop gets (the like-for-like ratio),
      and from the features, which adds the M float32 matrix products
      (2 N G D M floating-point operations) to the engine's time only.

Prints both times, their ratio and the engine's peak resident memory, and
writes them as JSON:

  python -m benchmarks.engine_speed --out=out/engine_speed.json
"""

from __future__ import annotations

import os
import platform
import resource
import time

import jax
import numpy as np
from absl import app, flags, logging

from engine import analysis, reference, report, retrieval, search_statistics, similarity, store, subsets, synthetic

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_queries", 6016, "N, the number of queries.")
flags.DEFINE_integer("num_gallery", None, "G, gallery size (default N).")
flags.DEFINE_integer("num_members", 11, "M, the number of representations.")
flags.DEFINE_integer("dim", 1024, "D, the feature size of every representation.")
flags.DEFINE_integer("naive_sample", 44, "Subsets timed for the naive loop (stratified by size).")
flags.DEFINE_float("memory_budget_gb", 4.0, "Memory budget of the engine, in GB.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic features and of the subset sample.")
flags.DEFINE_string("out", "out/engine_speed.json", "Where to write the JSON record.")


def _peak_rss_gb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _sample_masks(num_members: int, count: int, rng: np.random.Generator) -> np.ndarray:
    masks = subsets.all_masks(num_members)
    sizes = subsets.popcount(masks)
    per_size = max(1, count // num_members)
    chosen = [rng.choice(masks[sizes == size], size=min(per_size, int((sizes == size).sum())), replace=False)
              for size in range(1, num_members + 1)]
    return np.sort(np.concatenate(chosen))


def naive_recall_at_1(matrices: list[np.ndarray], mask: int) -> int:
    """Sum the members' matrices, take each row's argmax and count the hits (the first loop)."""
    members = subsets.mask_members(mask, len(matrices))
    total = matrices[members[0]].copy()
    for k in members[1:]:
        total += matrices[k]
    return int((total.argmax(axis=1) == np.arange(total.shape[0])).sum())


def main(argv: list[str]) -> None:
    del argv
    n, m = FLAGS.num_queries, FLAGS.num_members
    logging.info("generating synthetic features: N = %d, G = %s, M = %d, D = %d", n, FLAGS.num_gallery or n, m,
                 FLAGS.dim)
    features = synthetic.make_features(num_queries=n, num_gallery=FLAGS.num_gallery, num_members=m,
                                       dim=FLAGS.dim, seed=FLAGS.seed)
    rss_before = _peak_rss_gb()

    # Both engine runs start from empty JIT caches, so each includes its compilation.
    jax.clear_caches()
    start = time.perf_counter()
    result = retrieval.search(similarity.from_features(features), ks=(1, 5, 10),
                              modes=(retrieval.RAW, retrieval.STANDARDIZED),
                              memory_budget_gb=FLAGS.memory_budget_gb)
    features_seconds = time.perf_counter() - start
    engine_peak = _peak_rss_gb()

    # The statistics the main job adds by default (bootstrap intervals, paired
    # tests, 5-fold cross-validation), from the same per-query ranks.
    start = time.perf_counter()
    analyses = analysis.analyse(result)
    analyses_seconds = time.perf_counter() - start
    start = time.perf_counter()
    stats = search_statistics.compute(result, num_resamples=1000, level=0.95, cv_folds=5, seed=FLAGS.seed)
    search_statistics.annotate(result, analyses, stats)
    statistics_seconds = time.perf_counter() - start

    logging.info("precomputing %d similarity matrices for the naive loop", m)
    matrices = [matrix.astype(np.float32) for matrix in reference.cosine_matrices(features.left, features.right)]
    jax.clear_caches()
    start = time.perf_counter()
    from_matrices = retrieval.search(similarity.from_matrices(features.names, matrices), ks=(1, 5, 10),
                                     modes=(retrieval.RAW, retrieval.STANDARDIZED),
                                     memory_budget_gb=FLAGS.memory_budget_gb + 4 * n * result.num_gallery * m / 2 ** 30)
    engine_seconds = time.perf_counter() - start
    # The two inputs round differently (float32 products vs float64 cast to
    # float32), so counts may differ, but only through near-tie decisions.
    matrices_difference = max(int(np.abs(result.modes[mode].recall - from_matrices.modes[mode].recall).max())
                              for mode in result.modes)
    rng = np.random.default_rng(FLAGS.seed)
    sample = _sample_masks(m, FLAGS.naive_sample, rng)
    all_sizes = subsets.popcount(subsets.all_masks(m))
    per_size_seconds: dict[int, list[float]] = {}
    agree = 0
    for mask in sample.tolist():
        start = time.perf_counter()
        naive = naive_recall_at_1(matrices, mask)
        per_size_seconds.setdefault(int(subsets.popcount(np.array([mask]))[0]), []).append(
            time.perf_counter() - start)
        engine = int(result.modes[retrieval.RAW].recall[result.row_of(mask), 0])
        agree += naive == engine
    naive_seconds = sum(float(np.median(times)) * int((all_sizes == size).sum())
                        for size, times in per_size_seconds.items())

    ratio = naive_seconds / engine_seconds
    record = {
        "num_queries": n,
        "num_gallery": result.num_gallery,
        "num_members": m,
        "dim": FLAGS.dim,
        "num_subsets": int(result.masks.size),
        "naive_seconds_extrapolated": naive_seconds,
        "naive_subsets_timed": int(sample.size),
        "naive_seconds_per_subset_median": float(np.median(np.concatenate(
            [np.asarray(v) for v in per_size_seconds.values()]))),
        "engine_seconds_both_modes": engine_seconds,
        "engine_stage_seconds": from_matrices.timings,
        "speedup": ratio,
        "engine_seconds_from_features": features_seconds,
        "engine_stage_seconds_from_features": result.timings,
        "speedup_from_features": naive_seconds / features_seconds,
        "recall_max_difference_matrices_vs_features": matrices_difference,
        "analyses_seconds": analyses_seconds,
        "statistics_seconds": statistics_seconds,
        "statistics_fraction_of_search_from_features": statistics_seconds / features_seconds,
        "engine_peak_rss_gb": engine_peak,
        "rss_before_engine_gb": rss_before,
        "whole_gallery_pairs": {mode: r.undecided_pairs for mode, r in result.modes.items()},
        "near_ties": {mode: int(r.near_ties.sum()) for mode, r in result.modes.items()},
        "naive_engine_recall_at_1_agree": f"{agree}/{sample.size}",
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "versions": report.library_versions(),
    }
    store.write_json(FLAGS.out, record)
    print(f"naive loop (raw, recall@1, {2 ** m - 1} subsets, extrapolated from {sample.size}): "
          f"{naive_seconds:.1f} s")
    print(f"engine from the same matrices (all subsets, raw + standardized, K = 1, 5, 10): "
          f"{engine_seconds:.1f} s; speedup {ratio:.1f}x")
    print(f"engine from features (similarity computation included): {features_seconds:.1f} s; "
          f"speedup {naive_seconds / features_seconds:.1f}x")
    print(f"statistics (1000 bootstrap resamples, paired tests, 5-fold cross-validation): "
          f"{statistics_seconds:.2f} s, {100 * statistics_seconds / features_seconds:.1f}% of the search "
          f"from features")
    print(f"largest recall-count difference between the two inputs: {matrices_difference} "
          f"(near-tie decisions: {record['near_ties']})")
    print(f"engine peak resident memory {engine_peak:.2f} GB "
          f"(features alone {rss_before:.2f} GB); naive and engine recall@1 agree on "
          f"{agree} of {sample.size} sampled subsets (argmax breaks ties in the query's favour "
          "when the match has the lower index, the engine counts ties against it)")
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
