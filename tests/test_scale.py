"""Sharded, chunked and resumable subset searches equal the plain single-device search.

Expected values: the single-device, single-process search in this process
(itself checked against the float64 brute force in test_retrieval.py), the
brute-force kernel `count_block_reference`, and `engine.reference`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from engine import analysis, reference, report, resume, retrieval, similarity, store, subsets, synthetic
from tests import scale_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _environment(**extra) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _assert_same(expected: dict[str, np.ndarray], got) -> None:
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.fixture(scope="module")
def single_device():
    return scale_worker.flatten(scale_worker.run_search())


def test_four_forced_devices_equal_one_device(single_device, tmp_path):
    out = tmp_path / "four.npz"
    subprocess.run([sys.executable, "-m", "tests.scale_worker", str(out)], cwd=ROOT, check=True, timeout=120,
                   env=_environment(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    got = np.load(out)
    assert int(got["devices"]) == 4
    assert int(single_device["raw/undecided_pairs"]) > 0
    _assert_same(single_device, got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(single_device, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"process{p}.npz" for p in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "tests.scale_worker", str(outs[p]), address, "2", str(p)],
                                cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for p in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()[-3000:]
    for out in outs:
        got = np.load(out)
        assert int(got["processes"]) == 2
        _assert_same(single_device, got)


@pytest.mark.parametrize("num_members, high_count", [(3, 1), (5, 2), (6, 4), (7, 8)])
def test_count_block_chunks_match_bruteforce(num_members, high_count):
    rng = np.random.default_rng(40 + num_members)
    differences = rng.integers(-6, 7, size=(3, 9, num_members)).astype(np.int32)
    upper = rng.integers(-8, 8, size=(3, num_members)).astype(np.int32)
    tolerance = rng.integers(0, 3, size=num_members).astype(np.int32)
    ks = (1, 3)
    low = num_members // 2
    expected = retrieval.count_block_reference(differences, upper, tolerance, ks)
    for start in range(0, 1 << (num_members - low), high_count):
        got = retrieval.count_block(differences, upper, tolerance, start, low_members=low, ks=ks,
                                    high_count=high_count)
        columns = np.arange(start << low, (start + high_count) << low)
        keep = columns > 0
        for got_part, expected_part in zip(got, expected):
            np.testing.assert_array_equal(np.asarray(got_part)[:, keep], expected_part[:, columns[keep]])


def test_count_masks_matches_bruteforce():
    rng = np.random.default_rng(47)
    num_members = 5
    differences = rng.integers(-6, 7, size=(4, 11, num_members)).astype(np.int32)
    differences[:, 2] = 0
    upper = rng.integers(-8, 8, size=(4, num_members)).astype(np.int32)
    tolerance = rng.integers(0, 3, size=num_members).astype(np.int32)
    masks = np.array([1, 3, 6, 17, 31, 31, 20])
    members = subsets.member_matrix(masks, num_members).T.astype(np.int32)
    got = retrieval.count_masks(differences, upper, tolerance, members, ks=(1, 2, 4))
    expected = retrieval.count_block_reference(differences, upper, tolerance, (1, 2, 4))
    for got_part, expected_part in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(got_part), expected_part[:, masks])


def test_leading_subset_ranks_equal_full_ranks():
    features = synthetic.make_features(num_queries=120, num_gallery=140, num_members=5, dim=16, noise=0.8, seed=33)
    source = similarity.from_features(features)
    full = retrieval.search(source, candidates_per_member=3, progress=False)
    reduced = retrieval.search(source, candidates_per_member=3, progress=False, keep_all_ranks=False,
                               rank_subsets=4)
    for mode, mode_result in reduced.modes.items():
        np.testing.assert_array_equal(mode_result.recall, full.modes[mode].recall)
        np.testing.assert_array_equal(mode_result.near_ties, full.modes[mode].near_ties)
        # The leading 4, the best of each size and the ablation's alternatives, plus the singles.
        reported = full.masks[analysis.reported_rows(full.modes[mode].recall, full.masks, 5, top=4)]
        expected_masks = np.union1d(reported, 1 << np.arange(5))
        order = analysis.subset_order(full.modes[mode].recall, full.masks)
        assert np.isin(full.masks[order][:4], expected_masks).all()
        np.testing.assert_array_equal(mode_result.rank_masks, expected_masks)
        for mask in expected_masks:
            np.testing.assert_array_equal(mode_result.ranks_of(mask), full.modes[mode].ranks[full.row_of(mask)])
        kept_rows = np.isin(full.masks[full.modes[mode].near_tie_pairs[:, 0]], expected_masks)
        np.testing.assert_array_equal(mode_result.near_tie_pairs, full.modes[mode].near_tie_pairs[kept_rows])
        with pytest.raises(KeyError, match="not kept"):
            mode_result.ranks_of(int(np.setdiff1d(full.masks, expected_masks)[0]))
    assert analysis.analyse(reduced)["oracle"] == analysis.analyse(full)["oracle"]


def test_eighteen_members_in_chunks_match_reference():
    # 2^18 subsets: the full table runs in chunks of the high half; a sample
    # of subsets is checked against the float64 brute force.
    features = synthetic.make_features(num_queries=12, num_gallery=14, num_members=18, dim=6, noise=0.5, seed=34)
    result = retrieval.search(similarity.from_features(features), ks=(1, 3), modes=("raw",), progress=False)
    assert result.masks.size == (1 << 18) - 1
    rng = np.random.default_rng(35)
    sample = np.sort(rng.choice(result.masks, size=300, replace=False))
    matrices = [np.asarray(a, np.float64) @ np.asarray(b, np.float64).T for a, b in zip(
        [x / np.linalg.norm(x, axis=1, keepdims=True) for x in features.left],
        [x / np.linalg.norm(x, axis=1, keepdims=True) for x in features.right])]
    expected = np.minimum(reference.subset_ranks(matrices, sample), 3)
    rows = np.searchsorted(result.masks, sample)
    got = result.modes["raw"].ranks[rows]
    pairs = result.modes["raw"].near_tie_pairs
    flagged = np.zeros(result.modes["raw"].ranks.shape, bool)
    flagged[pairs[:, 0], pairs[:, 1]] = True
    assert ((got == expected) | flagged[rows]).all()


def test_subset_list_matches_full_table():
    features = synthetic.make_features(num_queries=40, num_gallery=50, num_members=10, dim=8, seed=36)
    source = similarity.from_features(features)
    limited = retrieval.search(source, max_subset_size=2, ks=(1, 5), progress=False)
    full = retrieval.search(source, ks=(1, 5), progress=False)
    rows = np.searchsorted(full.masks, limited.masks)
    for mode in limited.modes:
        np.testing.assert_array_equal(limited.modes[mode].recall, full.modes[mode].recall[rows])
        np.testing.assert_array_equal(limited.modes[mode].ranks, full.modes[mode].ranks[rows])
    searched = report.searched(limited)
    assert searched["max_subset_size_limit"] == 2
    assert searched["subsets_per_size"] == {"1": 10, "2": 45}
    listed = retrieval.search(source, masks=np.array([0b11, 0b1100000000]), ks=(1,), progress=False)
    assert report.searched(listed)["subset_list"] == ["rep00+rep01", "rep08+rep09"]


def test_resume_with_other_inputs_is_rejected(tmp_path):
    first = resume.RunCheckpoint(tmp_path / "run")
    first.bind({"ks": [1, 5], "modes": ["raw"], "inputs": {"a": 1}})
    with pytest.raises(resume.ResumeError, match="Pass --resume"):
        resume.RunCheckpoint(tmp_path / "run").bind({"ks": [1, 5], "modes": ["raw"], "inputs": {"a": 1}})
    with pytest.raises(resume.ResumeError, match=r"differ \(ks: checkpoint \[1, 5\], now \[1, 10\]; modes"):
        resume.RunCheckpoint(tmp_path / "run", resume=True).bind(
            {"ks": [1, 10], "modes": ["raw", "standardized"], "inputs": {"a": 1}})
    with pytest.raises(resume.ResumeError, match="contains no checkpointed run"):
        resume.RunCheckpoint(tmp_path / "other", resume=True).bind({"ks": [1]})
    resume.RunCheckpoint(tmp_path / "run", resume=True).bind({"ks": [1, 5], "modes": ["raw"], "inputs": {"a": 1}})


def test_checkpoint_round_trips_empty_and_typed_arrays(tmp_path):
    checkpoint = resume.RunCheckpoint(tmp_path / "run", every_seconds=0)
    arrays = {"pairs": np.zeros((0, 2), np.int64), "ranks": np.arange(6, dtype=np.uint8).reshape(2, 3),
              "flags": np.array([True, False])}
    assert checkpoint.load("stage") is None
    checkpoint.save("stage", arrays, {"rows_done": 7})
    checkpoint.save("stage", {**arrays, "ranks": arrays["ranks"] + 1}, {"rows_done": 9})
    restored, meta = resume.RunCheckpoint(tmp_path / "run").load("stage")
    assert meta == {"rows_done": 9}
    for name, value in {**arrays, "ranks": arrays["ranks"] + 1}.items():
        assert restored[name].dtype == value.dtype
        assert restored[name].shape == value.shape
        np.testing.assert_array_equal(restored[name], value)


def test_search_resumes_in_process_and_rejects_other_flags(tmp_path):
    features = synthetic.make_features(num_queries=60, num_gallery=70, num_members=4, dim=8, seed=38)
    source = similarity.from_features(features)

    def checkpointed(resume_run: bool, ks=(1, 5)):
        checkpoint = resume.RunCheckpoint(tmp_path / "run", every_seconds=0, resume=resume_run)
        return retrieval.search(source, ks=ks, candidates_per_member=2, progress=False, checkpoint=checkpoint)

    first = checkpointed(False)
    again = checkpointed(True)
    for mode in first.modes:
        np.testing.assert_array_equal(again.modes[mode].recall, first.modes[mode].recall)
        np.testing.assert_array_equal(again.modes[mode].ranks, first.modes[mode].ranks)
        np.testing.assert_array_equal(again.modes[mode].near_tie_pairs, first.modes[mode].near_tie_pairs)
    with pytest.raises(resume.ResumeError, match=r"ks: checkpoint \[1, 5\], now \[1, 3\]"):
        checkpointed(True, ks=(1, 3))


def _write_store(path, **problem) -> None:
    features = synthetic.make_features(**problem)
    for name, left, right in zip(features.names, features.left, features.right):
        store.write_array(os.path.join(path, name, store.LEFT_NAME), left)
        store.write_array(os.path.join(path, name, store.RIGHT_NAME), right)


def _cli(features, out, *extra) -> list[str]:
    return [sys.executable, "-m", "benchmarks.subset_search", f"--features_dir={features}", f"--out_dir={out}",
            "--figures=false", "--ks=1,5", *extra]


def _outputs(out) -> tuple[str, dict]:
    with open(os.path.join(out, "subsets.csv")) as f:
        table = f.read()
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return table, _without_timings(summary)


def _without_timings(value):
    """Drop wall-clock entries (keys naming seconds) at any depth; they differ between runs."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_killed_run_resumes_to_identical_outputs(tmp_path):
    features = tmp_path / "features"
    _write_store(features, num_queries=900, num_members=9, dim=16, seed=37)
    checkpoints = tmp_path / "checkpoints"
    progress = checkpoints / "process_0" / "mode_0"
    flags = ("--checkpoint_dir=" + str(checkpoints), "--checkpoint_every_seconds=0")
    run = subprocess.Popen(_cli(features, tmp_path / "killed", *flags), cwd=ROOT, env=_environment(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (progress.is_dir() and any(p.name.isdigit() for p in progress.iterdir())):
        assert run.poll() is None, "the run ended before its first progress checkpoint"
        assert time.monotonic() < deadline, "no progress checkpoint within 60 s"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()

    # The resumed and the uninterrupted run go side by side to save time.
    resumed = subprocess.Popen(_cli(features, tmp_path / "resumed", *flags, "--resume"), cwd=ROOT,
                               env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    plain = subprocess.Popen(_cli(features, tmp_path / "plain"), cwd=ROOT, env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, plain_log = plain.communicate(timeout=120)
    _, resumed_log = resumed.communicate(timeout=120)
    assert plain.returncode == 0, plain_log[-3000:]
    assert resumed.returncode == 0, resumed_log[-3000:]
    assert "restored" in resumed_log
    resumed_table, resumed_summary = _outputs(tmp_path / "resumed")
    plain_table, plain_summary = _outputs(tmp_path / "plain")
    assert resumed_table == plain_table
    assert resumed_summary == plain_summary
