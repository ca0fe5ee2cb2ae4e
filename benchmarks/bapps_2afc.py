"""Evaluate LPIPS distances and baselines on BAPPS 2AFC or JND.

    python -m benchmarks.bapps_2afc --data_dir=BAPPS --split=val --nets=alex,vgg,squeeze --out_dir=OUT
    python -m benchmarks.bapps_2afc --demo --out_dir=OUT

Writes OUT/scores.csv, OUT/distances.csv, OUT/summary.json and OUT/report.md.
Channel profiles are cached under --cache_dir, so a second run with other
analysis settings does not run the networks again.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

from engine import bapps_pipeline, bapps_report, store
from extractors import bapps, bapps_demo, lpips_nets, registry

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "BAPPS root holding 2afc/ and jnd/ (or one of those folders).")
flags.DEFINE_string("split", "val", "Split to evaluate: val or train (JND has only val).")
flags.DEFINE_enum("task", "auto", ["auto", "2afc", "jnd"], "Task; auto picks the one present under --data_dir.")
flags.DEFINE_list("nets", ["alex", "vgg", "squeeze"], "LPIPS nets: alex, vgg, squeeze.")
flags.DEFINE_list("categories", None, "Categories to evaluate, in report order; default: all present.")
flags.DEFINE_string("backbone_weights", "",
                    "Comma-separated NET=PATH torchvision-format state dicts, e.g. alex=/w/alexnet.pth; "
                    "nets not listed use torchvision's ImageNet file from torch's hub cache.")
flags.DEFINE_integer("random_backbone_seed", None,
                     "Use seeded RANDOM backbones instead of pretrained ones (tests only; not LPIPS).")
flags.DEFINE_bool("allow_download", True, "Download missing torchvision weights (ignored with --demo).")
flags.DEFINE_enum("lpips_version", "0.1", list(lpips_nets.VERSIONS), "LPIPS version of input scaling and weights.")
flags.DEFINE_string("out_dir", None, "Output directory.")
flags.DEFINE_string("cache_dir", "cache/bapps", "Profile cache directory; empty disables the cache.")
flags.DEFINE_integer("batch_size", 50, "Images per forward pass.")
flags.DEFINE_string("device", "cpu", "Torch device for the nets, e.g. cpu or cuda.")
flags.DEFINE_bool("trust_checkpoints", False, "Allow weight files that need full unpickling (runs code).")
flags.DEFINE_string("fit_split", "train", "2AFC split to fit channel weightings on; empty skips the fits.")
flags.DEFINE_list("l1", ["0", "1e-3"], "L1 penalties of the fitted weightings, one fit per value and net.")
flags.DEFINE_integer("fit_steps", 500, "Optimiser steps per fitted weighting.")
flags.DEFINE_list("search_metrics", None,
                  "Metrics of the combination search; default: each net's -lin and uncalibrated distance, "
                  "l2-lab, l2-rgb, ssim and every --retrieval_metrics. Pass 'none' to skip the search.")
flags.DEFINE_list("retrieval_metrics", [],
                  "Retrieval representations (registry names or groups, e.g. effnet_lite0,color_hist) scored as "
                  "the distance 1 - cosine of their embeddings; they join the score table and the search.")
flags.DEFINE_string("weights_dir", None, "Directory searched first for the weights of --retrieval_metrics.")
flags.DEFINE_integer("max_subset_size", None, "Largest metric combination searched.")
flags.DEFINE_integer("bootstrap_resamples", 1000,
                     "Resamples of the bootstrap intervals of the 2AFC scores and paired differences; 0 skips them.")
flags.DEFINE_float("confidence", 0.95, "Coverage of every interval; paired tests use the level 1 - confidence.")
flags.DEFINE_integer("cv_folds", 5, "Folds of the cross-validated selection over triplets (used when the choice "
                     "is not made on train); 0 skips it.")
flags.DEFINE_enum("select_on", "auto", ["auto", "train", "cv"],
                  "Where the held-out best combination and best single tap are chosen: train (choose on the train "
                  "split, score on --split; computes the train profiles), cv (cross-validate over the triplets "
                  "of --split), or auto (train when that split exists under --data_dir, else cv).")
flags.DEFINE_bool("demo", False, "Build a tiny BAPPS-layout set with SYNTHETIC judgments in OUT/demo_data "
                  "and evaluate it; pretrained backbones are used when in torch's hub cache, else RANDOM ones.")
flags.DEFINE_integer("seed", 0, "Seed of the demo set, the fits, the cross-validation folds and the bootstrap resamples.")


def _backbones(nets, demo: bool) -> dict[str, lpips_nets.BackboneSource]:
    paths = lpips_nets.parse_backbone_weights(FLAGS.backbone_weights, nets)
    return {net: lpips_nets.resolve_backbone(
                net, weights_path=paths.get(net), random_seed=FLAGS.random_backbone_seed,
                allow_download=FLAGS.allow_download and not demo, fallback_to_random=demo)
            for net in nets}


def _embedders(nets) -> list:
    if not FLAGS.retrieval_metrics:
        return []
    entries = registry.resolve(FLAGS.retrieval_metrics)
    reserved = set(nets) | set(bapps_pipeline.BASELINES)
    clashes = [e.name for e in entries if e.name in reserved or any(e.name.startswith(f"{n}-") for n in nets)]
    if clashes:
        raise _InputError(f"--retrieval_metrics {clashes} share a name with an LPIPS or baseline metric; "
                          "drop them or the clashing net.")
    for entry in entries:
        # Raises MissingWeightsError, naming the published file and where to put it.
        entry.find_weights(FLAGS.weights_dir)
    options = registry.BuildOptions(weights_dir=FLAGS.weights_dir, device=FLAGS.device,
                                    trust_checkpoints=FLAGS.trust_checkpoints, seed=FLAGS.seed)
    return [bapps.embedding_runner(entry, options) for entry in entries]


def _compute(data_dir, task, split, categories, runners, embedders):
    split_files = bapps.read_split(data_dir, task, split, categories)
    arrays, cache_report = bapps_pipeline.compute_split(
        split_files, runners, image_loader=bapps.load_images, load_size=bapps.LOAD_SIZE,
        cache_dir=FLAGS.cache_dir or None, batch_size=FLAGS.batch_size, embedders=embedders)
    return arrays, cache_report


def _header(task, split, data_dir, sources, demo) -> str:
    lines = [f"# BAPPS {task} {split}: LPIPS v{FLAGS.lpips_version}\n", f"Data: `{data_dir}`.\n"]
    if demo:
        lines.append(f"**{bapps_demo.SYNTHETIC_NOTE}**\n")
    random_nets = [net for net, source in sources.items() if source.kind == "random"]
    if random_nets:
        lines.append(f"**WARNING: RANDOM backbone weights for {', '.join(random_nets)}: their distances are "
                     "not LPIPS and their scores mean nothing about LPIPS.**\n")
    lines += [f"- {net}: {source.describe()}" for net, source in sources.items()]
    return "\n".join(lines) + "\n"


def _run():
    if not FLAGS.out_dir:
        raise _InputError("--out_dir is required.")
    started = time.perf_counter()
    nets = [lpips_nets.get_net(n).name for n in FLAGS.nets]

    data_dir = FLAGS.data_dir
    if FLAGS.demo:
        if data_dir:
            raise _InputError("--demo builds and evaluates its own set in OUT/demo_data; drop --data_dir, "
                                 "or drop --demo to evaluate the data there.")
        data_dir = os.path.join(FLAGS.out_dir, "demo_data")
        if not os.path.isdir(os.path.join(data_dir, "2afc")):
            bapps_demo.build_demo_set(data_dir, seed=FLAGS.seed)
        logging.warning(bapps_demo.SYNTHETIC_NOTE)
    if not data_dir:
        raise _InputError("--data_dir is required (or pass --demo).")
    task = FLAGS.task
    if task == "auto":
        task = "2afc" if FLAGS.demo else bapps.detect_task(data_dir, FLAGS.split)

    sources = _backbones(nets, FLAGS.demo)
    runners = [lpips_nets.net_runner(net, sources[net], version=FLAGS.lpips_version, device=FLAGS.device,
                                     trust=FLAGS.trust_checkpoints) for net in nets]
    infos = {net: bapps_report.NetInfo(lpips_nets.get_net(net).channels,
                                       tuple(lpips_nets.load_linear_weights(net, FLAGS.lpips_version)),
                                       lpips_nets.get_net(net).tap_names)
             for net in nets}

    embedders = _embedders(nets)
    arrays, cache_report = _compute(data_dir, task, FLAGS.split, FLAGS.categories, runners, embedders)
    table = bapps_report.assemble(task, FLAGS.split, arrays, infos)

    loaded = {}

    def other_split(name):
        if name not in loaded:
            split_arrays, split_cache = _compute(data_dir, task, name, None, runners, embedders)
            loaded[name] = bapps_report.assemble(task, name, split_arrays, infos)
            for key in cache_report:
                cache_report[key] += split_cache[key]
        return loaded[name]

    train = None
    fit_split = FLAGS.fit_split
    if task == "2afc" and fit_split and fit_split != FLAGS.split:
        if os.path.isdir(bapps.split_dir(data_dir, task, fit_split)):
            train = other_split(fit_split)
        else:
            logging.info("no %s split under %s: skipping the fitted weightings", fit_split, data_dir)

    selection_train = None
    has_train = FLAGS.split != "train" and os.path.isdir(bapps.split_dir(data_dir, task, "train"))
    if task == "2afc" and FLAGS.select_on == "train" and not has_train:
        raise _InputError(f"--select_on=train needs a train split under {data_dir}/2afc other than --split="
                             f"{FLAGS.split}; use --select_on=cv to cross-validate over the {FLAGS.split} triplets.")
    if task == "2afc" and FLAGS.select_on != "cv" and has_train:
        selection_train = other_split("train")

    search_metrics = FLAGS.search_metrics
    if search_metrics == ["none"]:
        search_metrics = []
    elif search_metrics is None:
        search_metrics = (bapps_report.default_search_metrics(table, nets)
                          + [e.name for e in embedders])
    analyses = bapps_report.run_analyses(
        table, infos, search_metrics=search_metrics, max_subset_size=FLAGS.max_subset_size, train=train,
        l1_values=_l1_values(), fit_steps=FLAGS.fit_steps, seed=FLAGS.seed,
        bootstrap_resamples=FLAGS.bootstrap_resamples, confidence=FLAGS.confidence, cv_folds=FLAGS.cv_folds,
        selection_train=selection_train)

    select_on = None
    if selection_train is not None:
        select_on = selection_train.split
    elif FLAGS.cv_folds:
        select_on = "cv"
    summary = bapps_report.summary_dict(table, analyses)
    summary["config"] = {
        "data_dir": os.path.abspath(data_dir), "task": task, "split": FLAGS.split, "nets": nets,
        "retrieval_metrics": {e.name: e.fingerprint["representation"] for e in embedders},
        "lpips_version": FLAGS.lpips_version, "demo": FLAGS.demo, "synthetic_judgments": FLAGS.demo,
        "backbones": {net: {"kind": s.kind, "path": s.path, "seed": s.seed, "fingerprint": s.fingerprint}
                      for net, s in sources.items()},
        "random_backbones": [net for net, s in sources.items() if s.kind == "random"],
        "cache_dir": FLAGS.cache_dir, "fit_split": train.split if train else None,
        "select_on": select_on,
        "confidence": FLAGS.confidence, "cv_folds": FLAGS.cv_folds, "seed": FLAGS.seed,
        "bootstrap_resamples": FLAGS.bootstrap_resamples,
    }
    summary["cache"] = cache_report
    summary["seconds"] = time.perf_counter() - started

    out = FLAGS.out_dir
    bapps_report.write_scores_csv(os.path.join(out, "scores.csv"), analyses.metric_scores)
    bapps_report.write_distances_csv(os.path.join(out, "distances.csv"), table)
    store.write_json(os.path.join(out, "summary.json"), summary)
    report = bapps_report.markdown_report(table, analyses,
                                          header=_header(task, FLAGS.split, data_dir, sources, FLAGS.demo))
    store.write_text(os.path.join(out, "report.md"), report)
    logging.info("wrote %s in %.1f s", ", ".join(f"{out}/{n}" for n in
                 ("scores.csv", "distances.csv", "summary.json", "report.md")), summary["seconds"])


class _InputError(ValueError):
    """Bad flags, reported to the user in one line."""


def _l1_values() -> list[float]:
    try:
        values = [float(v) for v in FLAGS.l1]
    except ValueError as e:
        raise _InputError(f"--l1 must be a list of non-negative numbers, got {FLAGS.l1}.") from e
    if any(v < 0 for v in values):
        raise _InputError(f"--l1 must be non-negative, got {FLAGS.l1}.")
    return values


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        _run()
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        # Data and weight errors name the file and the fix; a traceback would only bury them.
        # Cached profiles and outputs written before the error stay on disk.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
