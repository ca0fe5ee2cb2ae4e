"""Checkpointed, resumable subset searches (orbax-checkpoint).

A run's directory contains one folder per process P. `process_P/fingerprint.json`
records what the run computes (inputs, names, K values, modes, subsets,
candidate count; see `engine.retrieval.search`). One orbax CheckpointManager
per stage stores `process_P/candidates` (the similarity pass, saved once) and
`process_P/mode_I` (progress of mode I, saved every `every_seconds`).
NOTE: only single-process runs may checkpoint; `search` rejects a
checkpoint with several processes, because orbax-checkpoint 0.12 writes
numpy state from process 0 only. Every saved state is a complete, consistent prefix of the work, so a run killed at
any moment, even by SIGKILL, resumes from its last state and ends with
outputs identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging as python_logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from engine import store

FINGERPRINT = "fingerprint.json"


class ResumeError(ValueError):
    """A checkpoint directory that does not belong to this run."""


class _HideOrbaxInfo(python_logging.Filter):
    """Drop orbax-checkpoint's INFO records (dozens per save) from the absl log; keep its warnings."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


# orbax logs through absl; the filter sits on absl's logger, which every absl.logging call uses.
python_logging.getLogger("absl").addFilter(_HideOrbaxInfo())


class RunCheckpoint:
    """Saves and restores the stages of one search.

    Args:
      directory: checkpoint directory (created when missing).
      every_seconds: minimum time between two progress saves, in seconds.
      resume: continue the run recorded in `directory`; without it a
        directory that already contains a run is rejected.
      process_index: this process (each process keeps its own states).
    """

    def __init__(self, directory: str | os.PathLike[str], *, every_seconds: float = 300.0,
                 resume: bool = False, process_index: int = 0):
        if every_seconds < 0:
            raise ValueError(f"checkpoint interval must be >= 0 seconds, got {every_seconds}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every_seconds = float(every_seconds)
        self.resume = resume
        self.process_index = process_index
        self._last_save = time.monotonic()
        self._managers: dict[str, ocp.CheckpointManager] = {}

    def bind(self, fingerprint: Mapping[str, Any]) -> None:
        """Record the run's fingerprint, or check it against the recorded one on resume.

        Raises:
          ResumeError: a resume whose fingerprint differs (the message lists
            the differing entries), a resume with nothing to resume, or a
            fresh run in a directory that already contains one.
        """
        # NOTE: orbax-checkpoint 0.12 writes numpy arrays only from process 0
        # (NumpyHandler checks jax.process_index() == 0), so the other
        # processes' rows would be lost; multi-process runs are rejected until
        # their states are saved as jax.Arrays or gathered on process 0.
        if jax.process_count() > 1:
            raise ValueError(f"checkpoints of multi-process runs are not supported ({jax.process_count()} "
                             "processes); run without --checkpoint_dir, or checkpoint single-process runs.")
        fingerprint = json.loads(json.dumps(dict(fingerprint), default=store._json_default))
        path = os.path.join(self._process_directory(), FINGERPRINT)
        if os.path.exists(path):
            with open(path) as f:
                recorded = json.load(f)
            if not self.resume:
                raise ResumeError(f"{self.directory} already contains a checkpointed run. Pass --resume to "
                                  "continue it, or choose another --checkpoint_dir.")
            differing = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
            if differing:
                details = "; ".join(f"{k}: checkpoint {_short(recorded.get(k))}, now {_short(fingerprint.get(k))}"
                                    for k in differing)
                raise ResumeError(f"cannot resume from {self.directory}: the inputs or flags differ ({details}). "
                                  "Rerun with the original inputs and flags, or start a fresh run in another "
                                  "--checkpoint_dir.")
            logging.info("resuming the run checkpointed in %s", self.directory)
            return
        if self.resume:
            raise ResumeError(f"--resume was given, but {self.directory} contains no checkpointed run "
                              f"({FINGERPRINT} is missing); drop --resume to start one.")
        store.write_json(path, fingerprint)

    def due(self) -> bool:
        """Return whether the interval since the last save has passed."""
        return time.monotonic() - self._last_save >= self.every_seconds

    def save(self, stage: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Save a stage's state (numpy arrays of any shape, including empty, and JSON metadata)."""
        manager = self._manager(stage)
        step = (manager.latest_step() or 0) + 1
        flat = {name: _padded(np.asarray(a)) for name, a in arrays.items()}
        shapes = {name: [list(np.shape(a)), np.asarray(a).dtype.str] for name, a in arrays.items()}
        manager.save(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave({"meta": dict(meta), "shapes": shapes})))
        manager.wait_until_finished()
        self._last_save = time.monotonic()
        logging.info("checkpointed %s (step %d) in %s", stage, step, self.directory)

    def load(self, stage: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Return (arrays, meta) of a stage's latest state, or None when it has none."""
        manager = self._manager(stage)
        step = manager.latest_step()
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        info = restored["meta"]
        arrays = {}
        for name, (shape, dtype) in info["shapes"].items():
            flat = np.asarray(restored["arrays"][name])
            arrays[name] = flat[:-1].astype(np.dtype(dtype)).reshape(shape)
        return arrays, info["meta"]

    def _process_directory(self) -> str:
        return os.path.join(self.directory, f"process_{self.process_index}")

    def _manager(self, stage: str) -> ocp.CheckpointManager:
        if stage not in self._managers:
            # Each process saves its own rows when its own interval has passed,
            # as the only (and primary) process of its checkpoints.
            alone = ocp.options.MultiprocessingOptions(primary_host=self.process_index,
                                                       active_processes={self.process_index})
            options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=False,
                                                   multiprocessing_options=alone)
            handlers = {"arrays": ocp.StandardCheckpointHandler(multiprocessing_options=alone),
                        "meta": ocp.JsonCheckpointHandler(multiprocessing_options=alone)}
            path = os.path.join(self._process_directory(), stage)
            os.makedirs(path, exist_ok=True)
            self._managers[stage] = ocp.CheckpointManager(path, options=options, item_handlers=handlers)
        return self._managers[stage]


def _padded(array: np.ndarray) -> np.ndarray:
    # orbax rejects empty arrays; one trailing element makes every array non-empty.
    flat = array.reshape(-1)
    return np.concatenate([flat, np.zeros(1, flat.dtype)])


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
