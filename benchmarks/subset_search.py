r"""Recall@K of every subset of representations on a retrieval set: the main job.

With no flags, builds (or reuses) the demo set, extracts every offline
representation (cached) and searches all their subsets:

  python -m benchmarks.subset_search

On a feature store of your own (one sub-directory per representation with
left.npy [N, D] and right.npy [G, D]):

  python -m benchmarks.subset_search --features_dir=FEATURES --out_dir=OUT \
      --modes=raw,standardized --ks=1,5,10

On Totally-Looks-Like with the representations whose weights are present:

  python -m benchmarks.subset_search --dataset=tll --data_dir=TLL \
      --weights_dir=WEIGHTS --representations=paper

Long runs checkpoint and resume (outputs equal an uninterrupted run):

  python -m benchmarks.subset_search --features_dir=FEATURES --out_dir=OUT \
      --checkpoint_dir=CKPT --checkpoint_every_seconds=600 [--resume]

Every local device is used; several hosts run one process each with
--coordinator_address, --num_processes and --process_id (or
--distributed=auto under SLURM); see docs/scale.md.

Writes OUT/subsets.csv, OUT/summary.json, OUT/report.md and PNG figures
(process 0 writes them).
Bootstrap intervals, paired tests against the best subset and cross-validated
selection are on by default (--bootstrap=1000 --confidence=0.95 --cv_folds=5
--seed=0; set --bootstrap=0 --cv_folds=0 to skip them). --fit_weights adds
per-representation weights fitted on the training folds and scored on the
held-out folds.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

from engine import (analysis, distributed, report, resume, retrieval, search_statistics, similarity, store,
                    subsets, weight_fit)

FLAGS = flags.FLAGS

flags.DEFINE_string("features_dir", None,
                    "Feature store to search. When unset, features are extracted (and cached) from "
                    "--dataset first.")
flags.DEFINE_string("out_dir", "out/subset_search", "Directory for subsets.csv, summary.json, report.md, figures.")
flags.DEFINE_list("representations", None,
                  "Representations to search, in run order (bit k of a mask is the k-th). With "
                  "--features_dir: names in the store (default: all). Without: registry names or "
                  "groups to extract (default: offline).")
flags.DEFINE_list("modes", ["raw", "standardized"], "Modes: raw (sum of cosine similarities) and/or "
                  "standardized (sum of similarities divided by their population standard deviation).")
flags.DEFINE_list("ks", ["1", "5", "10"], "K values of recall@K.")
flags.DEFINE_integer("max_subset_size", None, "Search only subsets with at most this many representations.")
flags.DEFINE_list("subsets", None, "Search only these subsets: names joined by '+' (e.g. a+b) or integer "
                  "bitmasks. Single representations are always included.")
flags.DEFINE_float("memory_budget_gb", 4.0, "Bound on the search's working memory, in GB.")
flags.DEFINE_integer("candidates_per_member", None,
                     "Top items per representation kept per query for pruning (default max(128, 4 K_max)). "
                     "Changes speed only, never results.")
flags.DEFINE_integer("rank_subsets", 64,
                     "When the per-query ranks of every subset do not fit --memory_budget_gb, keep them for "
                     "the single representations and this many leading subsets per mode (second pass).")
flags.DEFINE_string("checkpoint_dir", None, "Save progress here (orbax) so that an interrupted run can resume.")
flags.DEFINE_float("checkpoint_every_seconds", 300.0, "Least time between two progress checkpoints.")
flags.DEFINE_bool("resume", False, "Continue the run checkpointed in --checkpoint_dir; its inputs and flags "
                  "must be the same.")
flags.DEFINE_enum("distributed", "off", ["off", "explicit", "auto"],
                  "Multi-process run: 'explicit' joins with --coordinator_address, --num_processes and "
                  "--process_id; 'auto' lets JAX read them from the cluster (SLURM, Open MPI).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed=explicit.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed=explicit.")
flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1, for --distributed=explicit.")
flags.DEFINE_integer("top", 20, "Number of leading subsets listed per mode.")
flags.DEFINE_bool("figures", True, "Write PNG figures.")
flags.DEFINE_enum("dataset", "demo", ["demo", "tll", "pairs"],
                  "Dataset to extract features from when --features_dir is unset.")
flags.DEFINE_string("data_dir", None, "Dataset location for --dataset=tll or pairs.")
flags.DEFINE_string("weights_dir", None, "Directory searched first for published weight files.")
flags.DEFINE_bool("trust_checkpoints", False,
                  "Load checkpoints that hold objects outside the safe allowlist. Unpickling them can run code: "
                  "only for files you trust.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples over queries for the intervals and paired "
                     "differences; 0 disables them.")
flags.DEFINE_float("confidence", 0.95, "Coverage of every interval; paired tests use the significance level "
                   "1 - confidence.")
flags.DEFINE_integer("cv_folds", 5, "Folds of the cross-validation over queries (choose on the other folds, score "
                     "on the held-out one); 0 disables it.")
flags.DEFINE_bool("fit_weights", False, "Fit non-negative weights per representation on the training folds and "
                  "score them on the held-out folds (needs --cv_folds >= 2; one more pass over the similarities).")
flags.DEFINE_integer("fit_steps", 300, "Optimiser steps per fold of --fit_weights.")
flags.DEFINE_integer("fit_batch_size", 256, "Training queries per optimiser step of --fit_weights.")
flags.DEFINE_integer("fit_hard_per_member", 32, "Top gallery items per representation kept per query as hard "
                     "negatives of the --fit_weights surrogate.")
flags.DEFINE_integer("fit_tail_samples", 64, "Random gallery items per query that stand for the rest of the gallery "
                     "in the --fit_weights surrogate.")
flags.DEFINE_integer("seed", 0, "Seed of the folds, the bootstrap resamples and the weight fit.")
flags.DEFINE_bool("list_representations", False,
                  "List the registered representations and whether their weights are present, then exit.")


class _InputError(Exception):
    """Bad input reported to the user without a traceback."""


def _parse_ks() -> list[int]:
    try:
        return [int(k) for k in FLAGS.ks]
    except ValueError as e:
        raise _InputError(f"--ks must be integers, got {FLAGS.ks}.") from e


def _load() -> store.FeatureSet:
    """Load the features to search: --features_dir, or extract (cached) from --dataset."""
    if FLAGS.features_dir:
        return store.load_features(FLAGS.features_dir, FLAGS.representations)
    from extractors import pipeline

    selection = ",".join(FLAGS.representations) if FLAGS.representations else "offline"
    entries = pipeline.select_representations(selection, FLAGS.weights_dir)
    names = [entry.name for entry in entries]
    logging.info("no --features_dir: preparing %s features of the %s dataset", ", ".join(names), FLAGS.dataset)
    features_dir = pipeline.prepare_features(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                                             representations=",".join(names), weights_dir=FLAGS.weights_dir,
                                             trust_checkpoints=FLAGS.trust_checkpoints)
    # The cached store may hold more representations than this run selected.
    return store.load_features(features_dir, names)


def _validate_flags(num_queries: int) -> int:
    """Reject invalid flags before any work; return the number of cross-validation folds to use."""
    if FLAGS.memory_budget_gb <= 0:
        raise _InputError(f"--memory_budget_gb must be > 0, got {FLAGS.memory_budget_gb}.")
    if FLAGS.max_subset_size is not None and FLAGS.max_subset_size < 1:
        raise _InputError(f"--max_subset_size must be >= 1, got {FLAGS.max_subset_size}.")
    if not 0.0 < FLAGS.confidence < 1.0:
        raise _InputError(f"--confidence must lie in (0, 1), e.g. 0.95; got {FLAGS.confidence}.")
    if FLAGS.bootstrap < 0:
        raise _InputError(f"--bootstrap must be >= 0 resamples (0 disables intervals), got {FLAGS.bootstrap}.")
    if FLAGS.cv_folds < 0 or FLAGS.cv_folds == 1:
        raise _InputError(f"--cv_folds must be 0 (off) or at least 2, got {FLAGS.cv_folds}.")
    if os.path.exists(FLAGS.out_dir) and not os.path.isdir(FLAGS.out_dir):
        raise _InputError(f"--out_dir {FLAGS.out_dir!r} is an existing file; name a directory.")
    cv_folds = FLAGS.cv_folds
    if cv_folds > num_queries:
        if flags.FLAGS["cv_folds"].present:
            raise _InputError(f"--cv_folds={cv_folds} is more than the {num_queries} queries; use at most "
                              f"{num_queries} folds, or 0 to skip cross-validation.")
        logging.warning("cross-validation skipped: the default %d folds need at least %d queries, this set has %d.",
                        cv_folds, cv_folds, num_queries)
        cv_folds = 0
    if FLAGS.fit_weights and cv_folds < 2:
        raise _InputError(f"--fit_weights scores the fit on held-out folds; it needs --cv_folds >= 2 and at least "
                          f"that many queries (got {FLAGS.cv_folds} folds, {num_queries} queries).")
    return cv_folds


def _add_statistics(source: similarity.SimilaritySource, result: retrieval.SearchResult,
                    analyses: dict, cv_folds: int) -> dict:
    if not FLAGS.bootstrap and not cv_folds:
        return analyses
    stats = search_statistics.compute(result, num_resamples=FLAGS.bootstrap, level=FLAGS.confidence,
                                      cv_folds=cv_folds, seed=FLAGS.seed)
    analyses = search_statistics.annotate(result, analyses, stats)
    if FLAGS.fit_weights:
        options = weight_fit.FitOptions(hard_per_member=FLAGS.fit_hard_per_member,
                                        tail_samples=FLAGS.fit_tail_samples, steps=FLAGS.fit_steps,
                                        batch_size=FLAGS.fit_batch_size, seed=FLAGS.seed)
        searched_equal = search_statistics.has_equal_standardized(result)
        held_out = weight_fit.cross_validate_weights(
            source, stats.folds, result.std, ks=result.ks, options=options, compare_standardized=not searched_equal,
            memory_budget_gb=FLAGS.memory_budget_gb)
        analyses["fitted_weights"] = search_statistics.compare_fitted(
            result, stats, result.names, held_out.standardized, held_out.raw, held_out.ranks, held_out.near_ties,
            equal=None if searched_equal else weight_fit.STANDARDIZED_EQUAL)
        result.timings.update({f"fit_weights_{stage}": seconds for stage, seconds in held_out.seconds.items()})
    result.timings.update({f"statistics_{stage}": seconds for stage, seconds in stats.seconds.items()})
    return analyses


def run() -> dict[str, str]:
    ks = _parse_ks()
    features = _load()
    retrieval.validate_ks(ks, features.num_gallery)
    cv_folds = _validate_flags(features.num_queries)
    masks = None
    if FLAGS.subsets:
        masks = [subsets.parse_subset(text, features.names) for text in FLAGS.subsets]
    logging.info("searching %d representations (%s): N = %d queries, G = %d gallery items",
                 len(features.names), ", ".join(features.names), features.num_queries, features.num_gallery)

    start = time.perf_counter()
    source = similarity.from_features(features)
    # The source keeps normalised copies; dropping the host arrays frees their memory.
    features = dataclasses.replace(features, left=(), right=())
    topology = distributed.local()
    checkpoint = None
    fingerprint = None
    if FLAGS.checkpoint_dir:
        checkpoint = resume.RunCheckpoint(FLAGS.checkpoint_dir, every_seconds=FLAGS.checkpoint_every_seconds,
                                          resume=FLAGS.resume, process_index=topology.process_index)
        fingerprint = store.files_fingerprint(features.source, features.names)
    elif FLAGS.resume:
        raise _InputError("--resume needs --checkpoint_dir, the directory of the run to continue.")
    result = retrieval.search(
        source, ks=ks, modes=FLAGS.modes, masks=masks, max_subset_size=FLAGS.max_subset_size,
        memory_budget_gb=FLAGS.memory_budget_gb, candidates_per_member=FLAGS.candidates_per_member,
        topology=topology, rank_subsets=FLAGS.rank_subsets, checkpoint=checkpoint, input_fingerprint=fingerprint)
    result.timings["total_search"] = time.perf_counter() - start
    if topology.process_index != 0:
        logging.info("process %d done; process 0 writes the outputs", topology.process_index)
        return {}
    analyses = analysis.analyse(result, top=FLAGS.top)
    analyses = _add_statistics(source, result, analyses, cv_folds)

    manifest = features.manifest or {}
    notes = []
    dataset = manifest.get("dataset", {})
    if isinstance(dataset, dict) and dataset.get("name") == "demo":
        notes.append("NOTE: the demo set's pairs are synthetic (two views of the same scikit-image "
                     "photograph), not human similarity judgments; see docs/demo_data.md.")
    extra = {"features_dir": os.path.abspath(features.source), "dataset": dataset or None}
    paths = report.write_outputs(result, analyses, FLAGS.out_dir, extra_summary=extra,
                                 notes=notes, figures=FLAGS.figures)
    for mode, mode_out in analyses["modes"].items():
        best = mode_out["best"]
        logging.info("%s: best subset %s recalls %d of %d at K = %d", mode, best["representations"],
                     best[f"recall_at_{result.ks[0]}"], result.num_queries, result.ks[0])
    logging.info("wrote %s", ", ".join(sorted(paths.values())))
    return paths


def _join_processes() -> None:
    if FLAGS.distributed == "auto":
        distributed.initialize()
    elif FLAGS.distributed == "explicit":
        missing = [name for name in ("coordinator_address", "num_processes", "process_id")
                   if getattr(FLAGS, name) is None]
        if missing:
            raise _InputError(f"--distributed=explicit needs {', '.join('--' + m for m in missing)}.")
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.list_representations:
        from extractors import registry

        print(registry.describe(FLAGS.weights_dir))
        return
    try:
        _join_processes()
        run()
    except (_InputError, store.FeatureStoreError, ValueError, KeyError, MemoryError, FileNotFoundError,
            RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
