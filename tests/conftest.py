"""Shared fixtures: a small demo set built once per test session."""

import pytest

from extractors import demo


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """Return a demo PairDataset of 3 photographs x 3 pairs plus 1 distractor each: N = 9, G = 12."""
    config = demo.DemoConfig(photos=("astronaut", "coffee", "brick"), pairs_per_photo=3, distractors_per_photo=1,
                             view_size=96)
    return demo.demo_dataset(str(tmp_path_factory.mktemp("demo_cache")), config=config)
