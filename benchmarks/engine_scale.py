r"""Scaling benchmark of the subset search: a large gallery in a memory budget, 2^16 subsets, sharding.

Cases (each runs in its own subprocess, so XLA_FLAGS and peak memory are its own):

  large     N = G = 20,000, M = 8, D = 512 under --memory_budget_gb; time and peak RSS.
  m16       M = 16 (65,535 subsets) at N = G = 2,000.
  sharding  the same search on 1 and on --devices forced CPU devices; time ratio,
            and whether the results are identical.

  python -m benchmarks.engine_scale --cases=large,m16,sharding --out=out/engine_scale.json

Prints the figures and ratios and writes them as JSON. Features are synthetic
(engine.synthetic); timings on a shared machine are inflated by other load.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS

flags.DEFINE_list("cases", ["large", "m16", "sharding"], "Cases to run: large, m16, sharding.")
flags.DEFINE_float("memory_budget_gb", 4.0, "Memory budget of every search, in GB.")
flags.DEFINE_integer("large_queries", 20000, "N = G of the large case.")
flags.DEFINE_integer("large_members", 8, "M of the large case.")
flags.DEFINE_integer("m16_queries", 2000, "N = G of the m16 case.")
flags.DEFINE_integer("m16_members", 16, "M of the m16 case.")
flags.DEFINE_integer("sharding_queries", 2000, "N = G of the sharding case.")
flags.DEFINE_integer("sharding_members", 8, "M of the sharding case.")
flags.DEFINE_integer("devices", 4, "Forced CPU devices of the sharded run.")
flags.DEFINE_integer("dim", 512, "D, the feature size of every representation.")
flags.DEFINE_list("modes", ["raw", "standardized"], "Modes searched.")
flags.DEFINE_integer("candidates_per_member", None, "L (default: the engine's).")
flags.DEFINE_string("out", "out/engine_scale.json", "JSON file for the figures.")
flags.DEFINE_string("worker", None, "Internal: run one search with these JSON settings and print its figures.")


class _PeakMemory:
    """Samples the resident set size every 50 ms (ru_maxrss also counts it, at page granularity)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _worker(settings: dict) -> dict:
    """Run one search in this process; return its figures."""
    import jax

    from engine import retrieval, similarity, synthetic

    with _PeakMemory() as memory:
        start = time.perf_counter()
        features = synthetic.make_features(num_queries=settings["queries"], num_members=settings["members"],
                                           dim=settings["dim"], seed=0)
        generated = time.perf_counter() - start
        start = time.perf_counter()
        source = similarity.from_features(features)
        # The source keeps its own normalised copies, so the host arrays can go.
        del features
        result = retrieval.search(source, modes=settings["modes"],
                                  memory_budget_gb=settings["budget_gb"],
                                  candidates_per_member=settings["candidates_per_member"], progress=True)
        seconds = time.perf_counter() - start
    recall = np.concatenate([result.modes[m].recall.ravel() for m in result.modes])
    return {
        "queries": settings["queries"], "members": settings["members"], "dim": settings["dim"],
        "subsets": int(result.masks.size), "devices": jax.local_device_count(),
        "search_seconds": seconds, "feature_generation_seconds": generated, "timings": result.timings,
        "peak_rss_gb": max(memory.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30,
        "budget_gb": settings["budget_gb"],
        "whole_gallery_pairs": {m: r.undecided_pairs for m, r in result.modes.items()},
        "ranks_kept_for": {m: int(r.rank_masks.size) for m, r in result.modes.items()},
        "recall_checksum": int(np.sum(recall * np.arange(1, recall.size + 1) % 1000003)),
    }


def _run_case(queries: int, members: int, *, devices: int = 1) -> dict:
    settings = {"queries": queries, "members": members, "dim": FLAGS.dim, "modes": FLAGS.modes,
                "budget_gb": FLAGS.memory_budget_gb, "candidates_per_member": FLAGS.candidates_per_member}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    logging.info("running N = %d, M = %d on %d device(s)", queries, members, devices)
    done = subprocess.run([sys.executable, "-m", "benchmarks.engine_scale", f"--worker={json.dumps(settings)}"],
                          env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case N = {queries}, M = {members}, devices = {devices} failed (its log is above).")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["within_budget"] = figures["peak_rss_gb"] <= figures["budget_gb"]
    logging.info("N = %d, M = %d, %d device(s): %.1f s, peak RSS %.2f GB (budget %.1f GB)", queries, members,
                 figures["devices"], figures["search_seconds"], figures["peak_rss_gb"], figures["budget_gb"])
    return figures


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.worker:
        print(json.dumps(_worker(json.loads(FLAGS.worker))))
        return
    unknown = sorted(set(FLAGS.cases) - {"large", "m16", "sharding"})
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; valid: large, m16, sharding.")
    out: dict = {"note": "timings on a shared 2-core machine are inflated by other load", "cases": {}}
    if "large" in FLAGS.cases:
        out["cases"]["large"] = _run_case(FLAGS.large_queries, FLAGS.large_members)
    if "m16" in FLAGS.cases:
        out["cases"]["m16"] = _run_case(FLAGS.m16_queries, FLAGS.m16_members)
    if "sharding" in FLAGS.cases:
        one = _run_case(FLAGS.sharding_queries, FLAGS.sharding_members)
        many = _run_case(FLAGS.sharding_queries, FLAGS.sharding_members, devices=FLAGS.devices)
        out["cases"]["sharding"] = {
            "one_device": one, "forced_devices": many,
            "time_ratio": many["search_seconds"] / one["search_seconds"],
            "identical_recall": one["recall_checksum"] == many["recall_checksum"],
        }
    for name, figures in out["cases"].items():
        print(f"{name}: {json.dumps(figures, indent=1, default=float)}")
    from engine import store

    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    store.write_json(FLAGS.out, out)
    logging.info("wrote %s", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
