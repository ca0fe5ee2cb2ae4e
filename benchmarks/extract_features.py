"""Extract representations of a retrieval dataset into a feature store.

    python -m benchmarks.extract_features --dataset=demo --representations=offline
    python -m benchmarks.extract_features --dataset=tll --data_dir=~/data/tll \
        --representations=effnet_lite0,hog --features_dir=out/tll_features
    python -m benchmarks.extract_features --list_representations --weights_dir=~/weights

Re-running skips representations already extracted for the same dataset and
config, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

from absl import app, flags, logging

from extractors import checkpoints, datasets, pipeline, registry

_DATASET = flags.DEFINE_enum("dataset", "demo", list(datasets.DATASETS), "Which dataset to read.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Dataset location: the TLL folder (left/ and right/, or side-by-side images), the pairs "
    "CSV or its folder, or for the demo its cache directory (default cache/demo).")
_REPRESENTATIONS = flags.DEFINE_string(
    "representations", "offline", "Comma-separated representation names and groups (see --list_representations).")
_FEATURES_DIR = flags.DEFINE_string(
    "features_dir", None, "Feature store to write; default cache/features/<dataset>-<fingerprint>.")
_WEIGHTS_DIR = flags.DEFINE_string("weights_dir", None, "Directory searched first for weight files.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "DataLoader worker processes for decoding.")
_DEVICE = flags.DEFINE_string("device", None, "torch device; default cuda when available, else cpu.")
_TLL_CROP = flags.DEFINE_list(
    "tll_crop", ["245", "400", "200"], "Side-by-side TLL only: ROWS,WIDTH,SPLIT keeps rows [0, ROWS) and cuts "
    "columns [0, SPLIT) and [SPLIT, WIDTH) into the left and right image.")
_TRUST = flags.DEFINE_boolean(
    "trust_checkpoints", False,
    "Load checkpoints that hold objects outside the safe allowlist. Unpickling them can run code: "
    "only for files you trust.")
_LIST = flags.DEFINE_boolean(
    "list_representations", False, "Print every representation and whether its weights are present, then exit.")


def main(argv: list[str]) -> None:
    del argv
    if _LIST.value:
        print(registry.describe(_WEIGHTS_DIR.value))
        return
    dataset: str | datasets.PairDataset = _DATASET.value
    try:
        if _DATASET.value == "tll" and _DATA_DIR.value:
            rows, width, split = (int(v) for v in _TLL_CROP.value)
            dataset = datasets.tll(_DATA_DIR.value, rows=rows, width=width, split=split)
        features_dir = pipeline.prepare_features(
            dataset=dataset, data_dir=_DATA_DIR.value, representations=_REPRESENTATIONS.value,
            features_dir=_FEATURES_DIR.value, weights_dir=_WEIGHTS_DIR.value, batch_size=_BATCH_SIZE.value,
            num_workers=_NUM_WORKERS.value, device=_DEVICE.value, trust_checkpoints=_TRUST.value)
    except (KeyError, datasets.DatasetError, checkpoints.CheckpointError, pipeline.ExtractionError) as e:
        # These errors carry the file and the fix; a traceback would only bury them.
        # Representations and chunks finished before the error stay on disk.
        logging.error("%s", e.args[0] if e.args else e)
        raise SystemExit(1) from e
    logging.info("Feature store ready: %s", features_dir)
    print(features_dir)


if __name__ == "__main__":
    app.run(main)
