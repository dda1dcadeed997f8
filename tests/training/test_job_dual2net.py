"""Dual2Net stops at the run's time limit and resumes (see job_scenarios.py)."""

import pytest

from tests.training.job_scenarios import run_scenario

pytestmark = pytest.mark.timeout(2400)


def test_the_dual2net_stops_at_the_run_time_limit_and_resumes(tmp_path, fake_clock, eager):
    run_scenario("dual2net", tmp_path)
