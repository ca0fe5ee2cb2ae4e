"""Runs one seeded subset search and saves its results, for tests/test_scale.py.

Run as a subprocess so that XLA_FLAGS (forced CPU devices) or
jax.distributed apply before JAX starts:

  python -m tests.scale_worker OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import sys

import numpy as np

# The problem every run of the scale tests solves: several similarity tiles
# (the small budget makes tiles of 18 rows), a row count that no device count
# divides evenly, and a small L, so the whole-gallery recomputation runs.
PROBLEM = dict(num_queries=150, num_gallery=170, num_members=4, dim=16, noise=0.7, seed=31)
SEARCH = dict(ks=(1, 3, 5), memory_budget_gb=0.004, candidates_per_member=2, progress=False)


def run_search(topology=None):
    from engine import retrieval, similarity, synthetic

    features = synthetic.make_features(**PROBLEM)
    return retrieval.search(similarity.from_features(features), topology=topology, **SEARCH)


def flatten(result) -> dict[str, np.ndarray]:
    """Every number of a result that must not depend on devices or processes."""
    out = {"masks": result.masks, "mean": result.mean, "std": result.std}
    for mode, mode_result in result.modes.items():
        out[f"{mode}/recall"] = mode_result.recall
        out[f"{mode}/ranks"] = mode_result.ranks
        out[f"{mode}/rank_masks"] = mode_result.rank_masks
        out[f"{mode}/near_ties"] = mode_result.near_ties
        out[f"{mode}/near_tie_pairs"] = mode_result.near_tie_pairs
        out[f"{mode}/undecided_pairs"] = np.array(mode_result.undecided_pairs)
    return out


def main(argv: list[str]) -> None:
    from engine import distributed

    if len(argv) > 2:
        distributed.initialize(argv[2], int(argv[3]), int(argv[4]))
    topology = distributed.local()
    result = run_search(topology)
    np.savez(argv[1], devices=topology.num_shards, processes=topology.process_count, **flatten(result))


if __name__ == "__main__":
    main(sys.argv)
