"""Time Facets against the `lpips` package on a generated BAPPS-layout 2AFC set.

    python -m benchmarks.bapps_speed --out=OUT/bapps_speed.json

Two comparisons, in one run, with the same backbone weights (one seeded
random torchvision state dict per net, loaded by both sides) and batch size:

1. End to end per net: the package's `LPIPS(net=..., lpips=True)` computing
   d(ref, p0) and d(ref, p1) for every triplet, against Facets reading the
   split, extracting taps once per image, reducing them to channel profiles,
   writing the cache and computing every weighting's distances. Both sides
   read the images with the same loader.
2. Every analysis (all metrics' scores, the single-layer sweeps, the
   combination search) recomputed from the cached profiles, against running
   the package again. The package needs at least two runs per net
   (calibrated, and uncalibrated with per-layer outputs), or one per
   configuration (calibrated, uncalibrated, each single tap). Those package
   times are estimates: the measured calibrated run time times the run
   count, because the runs differ only in a 1x1 convolution.

Each timing is the median of --repeats runs after a warm-up batch, the two
sides alternating so that load from other processes hits both alike.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time

import lpips as lpips_package
import numpy as np
import torch
from absl import app, flags, logging

from engine import bapps_pipeline, bapps_report, store
from extractors import bapps, bapps_demo, lpips_nets

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "out/bapps_speed.json", "JSON file for the measurements.")
flags.DEFINE_string("work_dir", None, "Directory for the generated set and the caches; default: a temporary one.")
flags.DEFINE_integer("triplets_per_category", 334, "Triplets in each of the six val categories.")
flags.DEFINE_list("nets", ["alex", "vgg", "squeeze"], "LPIPS nets to time.")
flags.DEFINE_integer("batch_size", 50, "Triplets per batch on both sides.")
flags.DEFINE_integer("seed", 0, "Seed of the generated set and the random backbones.")
flags.DEFINE_integer("repeats", 3, "Timed runs per side; the median is reported.")


def _package_model(net: str, state_path: str) -> torch.nn.Module:
    model = lpips_package.LPIPS(net=net, version="0.1", lpips=True, pnet_rand=True, verbose=False)
    return lpips_nets.load_backbone_into_package(model, state_path).eval()


def _as_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@torch.inference_mode()
def time_package(model: torch.nn.Module, split: bapps.BappsSplit, batch_size: int) -> float:
    """Return the seconds the package takes for d(ref, p0) and d(ref, p1) of every triplet."""
    first = split.categories[0]
    warm = [_as_torch(bapps.load_images(first.images[f][:batch_size])) for f in ("ref", "p0")]
    model(*warm)
    start = time.perf_counter()
    for category in split.categories:
        for begin in range(0, len(category), batch_size):
            ref, p0, p1 = (_as_torch(bapps.load_images(category.images[f][begin:begin + batch_size]))
                           for f in ("ref", "p0", "p1"))
            model(ref, p0).numpy()
            model(ref, p1).numpy()
    return time.perf_counter() - start


def time_facets(data_dir: str, net: str, state_path: str, cache_dir: str, batch_size: int) -> float:
    """Return the seconds Facets takes from the files to every weighting's distances, cache written."""
    source = lpips_nets.resolve_backbone(net, weights_path=state_path)
    runner = lpips_nets.net_runner(net, source)
    info = {net: bapps_report.NetInfo(lpips_nets.get_net(net).channels, tuple(lpips_nets.load_linear_weights(net)))}
    warm_split = bapps.read_split(data_dir, "2afc", "val", ["traditional"])
    bapps_pipeline.compute_split(warm_split, [runner], image_loader=bapps.load_images, load_size=bapps.LOAD_SIZE,
                                 cache_dir=None, batch_size=batch_size, with_baselines=False)
    start = time.perf_counter()
    split = bapps.read_split(data_dir, "2afc", "val")
    arrays, report = bapps_pipeline.compute_split(split, [runner], image_loader=bapps.load_images,
                                                  load_size=bapps.LOAD_SIZE, cache_dir=cache_dir,
                                                  batch_size=batch_size, with_baselines=False)
    bapps_report.assemble("2afc", "val", arrays, info)
    seconds = time.perf_counter() - start
    if report["loaded"]:
        raise RuntimeError(f"the end-to-end timing must compute every profile, but loaded {report['loaded']}.")
    return seconds


def time_analyses(data_dir: str, runners, infos, cache_dir: str, batch_size: int) -> float:
    """Return the seconds for every analysis from the cache: read, load profiles, distances, scores, searches."""
    start = time.perf_counter()
    split = bapps.read_split(data_dir, "2afc", "val")
    arrays, report = bapps_pipeline.compute_split(split, runners, image_loader=bapps.load_images,
                                                  load_size=bapps.LOAD_SIZE, cache_dir=cache_dir,
                                                  batch_size=batch_size, with_baselines=False)
    if report["computed"]:
        raise RuntimeError(f"expected every profile in the cache, computed {report['computed']}.")
    table = bapps_report.assemble("2afc", "val", arrays, infos)
    bapps_report.run_analyses(table, infos)
    return time.perf_counter() - start


def main(argv):
    del argv
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="bapps_speed.")
    data_dir = os.path.join(work_dir, "data")
    counts = {("val", c): FLAGS.triplets_per_category for c in bapps.CATEGORIES[("2afc", "val")]}
    if not os.path.isdir(os.path.join(data_dir, "2afc")):
        bapps_demo.build_demo_set(data_dir, seed=FLAGS.seed, counts_2afc=counts, count_jnd=0)
    split = bapps.read_split(data_dir, "2afc", "val")
    logging.info("timing on %d triplets at %d x %d", len(split), bapps.LOAD_SIZE, bapps.LOAD_SIZE)

    results = {"triplets": len(split), "batch_size": FLAGS.batch_size, "nets": {},
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "torch": torch.__version__}
    runners, infos, last_cache = [], {}, {}
    for net in FLAGS.nets:
        state_path = lpips_nets.write_random_backbone(
            net, os.path.join(work_dir, f"{net}-seed{FLAGS.seed}.pth"), seed=FLAGS.seed)
        model = _package_model(net, state_path)
        package_runs, facets_runs = [], []
        for _ in range(FLAGS.repeats):
            package_runs.append(time_package(model, split, FLAGS.batch_size))
            # A fresh cache directory each time, so every run computes and writes its profiles.
            cache_dir = tempfile.mkdtemp(prefix="cache.", dir=work_dir)
            facets_runs.append(time_facets(data_dir, net, state_path, cache_dir, FLAGS.batch_size))
        last_cache[net] = cache_dir
        package_seconds = float(np.median(package_runs))
        facets_seconds = float(np.median(facets_runs))
        taps = len(lpips_nets.get_net(net).channels)
        results["nets"][net] = {
            "package_end_to_end_s": package_seconds, "facets_end_to_end_s": facets_seconds,
            "package_runs_s": package_runs, "facets_runs_s": facets_runs,
            "speedup_end_to_end": package_seconds / facets_seconds,
            "package_runs_minimum": 2, "package_runs_per_configuration": 2 + taps}
        logging.info("%s end to end: package %.1f s, Facets %.1f s, speedup %.2fx",
                     net, package_seconds, facets_seconds, package_seconds / facets_seconds)
        runners.append(lpips_nets.net_runner(net, lpips_nets.resolve_backbone(net, weights_path=state_path)))
        infos[net] = bapps_report.NetInfo(lpips_nets.get_net(net).channels,
                                          tuple(lpips_nets.load_linear_weights(net)))

    # Each net's last end-to-end run left its profiles in its own cache directory; merge them.
    cache_dir = tempfile.mkdtemp(prefix="cache.", dir=work_dir)
    for net_cache in last_cache.values():
        shutil.copytree(net_cache, cache_dir, dirs_exist_ok=True)
    time_analyses(data_dir, runners, infos, cache_dir, FLAGS.batch_size)  # warm-up: compiles the kernels
    analyses_seconds = float(np.median([time_analyses(data_dir, runners, infos, cache_dir, FLAGS.batch_size)
                                        for _ in range(FLAGS.repeats)]))
    package_minimum = sum(r["package_end_to_end_s"] * r["package_runs_minimum"] for r in results["nets"].values())
    package_per_configuration = sum(r["package_end_to_end_s"] * r["package_runs_per_configuration"]
                                    for r in results["nets"].values())
    results["analyses"] = {
        "facets_from_cache_s": analyses_seconds,
        "package_estimate_minimum_runs_s": package_minimum,
        "package_estimate_per_configuration_s": package_per_configuration,
        "speedup_vs_minimum_runs": package_minimum / analyses_seconds,
        "speedup_vs_per_configuration": package_per_configuration / analyses_seconds,
    }
    store.write_json(FLAGS.out, results)
    for net, r in results["nets"].items():
        logging.info("%-8s end to end: package %7.1f s  Facets %7.1f s  speedup %.2fx",
                     net, r["package_end_to_end_s"], r["facets_end_to_end_s"], r["speedup_end_to_end"])
    a = results["analyses"]
    logging.info("analyses from the cache: %.2f s; package reruns %.1f s (minimum, %.0fx) to %.1f s "
                 "(one per configuration, %.0fx); written to %s", a["facets_from_cache_s"],
                 a["package_estimate_minimum_runs_s"], a["speedup_vs_minimum_runs"],
                 a["package_estimate_per_configuration_s"], a["speedup_vs_per_configuration"], FLAGS.out)


if __name__ == "__main__":
    app.run(main)
