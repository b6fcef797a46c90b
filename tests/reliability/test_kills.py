"""kill -9 during saves at random instants and at every named fault point (fast counts; see kills.py)."""
import pytest

from reliability import kills
from reliability.common import count


@pytest.mark.timeout(300)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_9_at_random_instants(async_save):
    tally = kills.run_kills(count("kills", 20), async_save)
    tally.assert_all_ok()
    assert tally.figures["unloadable"] == 0 and tally.figures["lost_to_retention"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_9_at_named_points(async_save):
    tally = kills.run_named(repeats=count("named_repeats", 1), async_save=async_save)
    tally.assert_all_ok()
    assert tally.figures["new"] > 0 and tally.figures["previous"] > 0  # both sides of the commit were hit
