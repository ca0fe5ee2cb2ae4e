r"""Cost of the statistics layer against the plain subset search it annotates.

On synthetic features (defaults: N = G = 6,016 queries, M = 11
representations, D = 1,024, the size of the Totally-Looks-Like experiment),
in one run:

  (a) the plain search: every subset in both modes with K = 1, 5, 10 and the
      analyses (similarities from features and JIT compilation included);
  (b) the statistics of the same result: bootstrap intervals of every
      reported subset, paired tests against the best, and k-fold
      cross-validated selection overall and per size. Timed once from a cold
      start (JIT compilation included, what a user pays) and then
      `--repeats` more times (warm, median reported).

Prints both times and the ratio (b) / (a), and writes them as JSON:

  python -m benchmarks.statistics_speed --out=out/statistics_speed.json

With --fit_weights the cross-validated weight fit is timed as well; it
makes its own passes over the similarities and is reported separately.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
from absl import app, flags, logging

from engine import analysis, report, retrieval, search_statistics, similarity, store, synthetic, weight_fit

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_queries", 6016, "N, the number of queries.")
flags.DEFINE_integer("num_members", 11, "M, the number of representations.")
flags.DEFINE_integer("dim", 1024, "D, the feature size of every representation.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples.")
flags.DEFINE_float("confidence", 0.95, "Interval coverage.")
flags.DEFINE_integer("cv_folds", 5, "Cross-validation folds.")
flags.DEFINE_integer("repeats", 3, "Warm repetitions of the statistics after the cold one.")
flags.DEFINE_bool("fit_weights", False, "Also time the cross-validated weight fit.")
flags.DEFINE_float("memory_budget_gb", 4.0, "Memory budget of the search, in GB.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic features, folds and resamples.")
flags.DEFINE_string("out", "out/statistics_speed.json", "Where to write the JSON record.")


def _statistics(result: retrieval.SearchResult, analyses: dict) -> tuple[float, search_statistics.SearchStatistics]:
    start = time.perf_counter()
    stats = search_statistics.compute(result, num_resamples=FLAGS.bootstrap, level=FLAGS.confidence,
                                      cv_folds=FLAGS.cv_folds, seed=FLAGS.seed)
    search_statistics.annotate(result, analyses, stats)
    return time.perf_counter() - start, stats


def main(argv: list[str]) -> None:
    del argv
    n, m = FLAGS.num_queries, FLAGS.num_members
    logging.info("generating synthetic features: N = G = %d, M = %d, D = %d", n, m, FLAGS.dim)
    features = synthetic.make_features(num_queries=n, num_members=m, dim=FLAGS.dim, seed=FLAGS.seed)
    source = similarity.from_features(features)

    start = time.perf_counter()
    result = retrieval.search(source, ks=(1, 5, 10), modes=(retrieval.RAW, retrieval.STANDARDIZED),
                              memory_budget_gb=FLAGS.memory_budget_gb)
    analyses = analysis.analyse(result)
    plain_seconds = time.perf_counter() - start

    cold_seconds, stats = _statistics(result, analyses)
    warm = [_statistics(result, analyses)[0] for _ in range(FLAGS.repeats)]
    record = {
        "num_queries": n,
        "num_members": m,
        "dim": FLAGS.dim,
        "num_subsets": int(result.masks.size),
        "bootstrap": FLAGS.bootstrap,
        "confidence": FLAGS.confidence,
        "cv_folds": FLAGS.cv_folds,
        "plain_search_seconds": plain_seconds,
        "plain_search_stages": result.timings,
        "statistics_cold_seconds": cold_seconds,
        "statistics_warm_seconds_median": float(np.median(warm)) if warm else None,
        "statistics_stages_last": stats.seconds,
        "ratio_cold": cold_seconds / plain_seconds,
        "ratio_warm": float(np.median(warm)) / plain_seconds if warm else None,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]},
        "versions": report.library_versions(),
    }
    if FLAGS.fit_weights:
        start = time.perf_counter()
        held = weight_fit.cross_validate_weights(source, stats.folds, result.std, ks=result.ks,
                                                 memory_budget_gb=FLAGS.memory_budget_gb)
        record["fit_weights_seconds"] = time.perf_counter() - start
        record["fit_weights_stages"] = held.seconds
        record["fit_weights_ratio"] = record["fit_weights_seconds"] / plain_seconds
        full = result.row_of((1 << m) - 1)
        record["held_out_recall_at_1"] = {
            "fitted_weights": int((held.ranks[weight_fit.FITTED] < 1).sum()),
            "equal_standardized_weights": int((result.modes[retrieval.STANDARDIZED].ranks[full] < 1).sum()),
            **{f"cross_validated_best_subset_{mode}": int((stats.held_out_ranks(result, mode) < 1).sum())
               for mode in result.modes},
        }

    store.write_json(FLAGS.out, record)
    print(json.dumps({k: record[k] for k in ("plain_search_seconds", "statistics_cold_seconds",
                                              "statistics_warm_seconds_median", "ratio_cold", "ratio_warm")},
                     indent=2))
    print(f"plain search (all {result.masks.size} subsets, 2 modes, K = 1, 5, 10, analyses): {plain_seconds:.1f} s")
    print(f"statistics ({FLAGS.bootstrap} resamples, {FLAGS.cv_folds}-fold CV, paired tests): "
          f"{cold_seconds:.2f} s cold, {record['statistics_warm_seconds_median'] or float('nan'):.2f} s warm")
    print(f"added cost: {100 * record['ratio_cold']:.1f}% of the plain run (cold)")
    if FLAGS.fit_weights:
        print(f"cross-validated weight fit: {record['fit_weights_seconds']:.1f} s "
              f"({100 * record['fit_weights_ratio']:.0f}% of the plain run); held-out recall@1: "
              + ", ".join(f"{name} {count}" for name, count in record["held_out_recall_at_1"].items()))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
