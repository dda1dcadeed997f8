"""The encoder-decoder stops at the run's time limit and resumes (see job_scenarios.py)."""

import pytest

from tests.training.job_scenarios import run_scenario

pytestmark = pytest.mark.timeout(2400)


def test_the_encoder_decoder_stops_at_the_run_time_limit_and_resumes(tmp_path, fake_clock, eager):
    run_scenario("encoder-decoder", tmp_path)


def test_every_segmenter_has_its_scenario_and_its_file():
    from pathlib import Path

    from rmib.tasks import SEGMENT_METHODS
    from tests.training.job_scenarios import SCENARIOS

    assert sorted(SCENARIOS) == sorted(SEGMENT_METHODS)
    here = Path(__file__).parent
    for name in SCENARIOS:
        assert (here / f"test_job_{name.replace('-', '_')}.py").is_file(), name
