"""Measure extraction speed (images per second) of each representation on this machine.

    python -m benchmarks.extract_speed --representations=offline --output=out/extract_speed.json

Each representation embeds the first --num_images demo images (left then
right) once to warm up, then --repeats more times; the median time of a
pass gives images per second, split into preprocessing (decode, resize,
descriptor) and embedding (the forward pass), both single-process.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np
from absl import app, flags, logging

from engine import store
from extractors import datasets, pipeline

_REPRESENTATIONS = flags.DEFINE_string("representations", "offline", "Names and groups to measure.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 128, "Demo images per pass.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes after one warm-up pass.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_DEVICE = flags.DEFINE_string("device", None, "torch device; default cuda when available, else cpu.")
_WEIGHTS_DIR = flags.DEFINE_string("weights_dir", None, "Directory searched first for weight files.")
_OUTPUT = flags.DEFINE_string("output", "out/extract_speed.json", "Where to write the JSON results.")


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(entry, refs, *, options, batch_size: int, repeats: int) -> dict:
    """Return preprocessing and embedding times of `entry` on `refs`, medians over `repeats` passes."""
    import torch

    extractor = entry.build(options)
    images = [datasets.load_image(r) for r in refs]
    preprocess_times, embed_times = [], []
    for repeat in range(repeats + 1):
        started = time.perf_counter()
        items = [extractor.preprocess(image) for image in images]
        preprocessed = time.perf_counter()
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = torch.stack(chunk) if isinstance(chunk[0], torch.Tensor) else np.stack(chunk)
            extractor.embed(batch)
        _synchronize(options.device)
        finished = time.perf_counter()
        if repeat:  # The first pass is the warm-up.
            preprocess_times.append(preprocessed - started)
            embed_times.append(finished - preprocessed)
    preprocess, embed = statistics.median(preprocess_times), statistics.median(embed_times)
    return {"images": len(images), "preprocess_s": preprocess, "embed_s": embed,
            "images_per_second": len(images) / (preprocess + embed),
            "embed_images_per_second": len(images) / embed}


def main(argv: list[str]) -> None:
    del argv
    import torch

    from extractors import registry

    dataset = datasets.load_dataset("demo")
    refs = (dataset.left + dataset.right)[:_NUM_IMAGES.value]
    options = registry.BuildOptions(weights_dir=_WEIGHTS_DIR.value, device=_DEVICE.value or pipeline.default_device())
    results = {}
    for entry in pipeline.select_representations(_REPRESENTATIONS.value, _WEIGHTS_DIR.value):
        results[entry.name] = measure(entry, refs, options=options, batch_size=_BATCH_SIZE.value,
                                      repeats=_REPEATS.value)
        logging.info("%s: %.1f images/s (%.1f images/s in the forward pass alone)", entry.name,
                     results[entry.name]["images_per_second"], results[entry.name]["embed_images_per_second"])
    report = {"device": options.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "machine": platform.platform(), "torch": torch.__version__, "batch_size": _BATCH_SIZE.value,
              "repeats": _REPEATS.value, "representations": results}
    store.write_json(_OUTPUT.value, report)
    for name, result in results.items():
        print(f"{name:16s} {result['images_per_second']:8.1f} images/s")
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
