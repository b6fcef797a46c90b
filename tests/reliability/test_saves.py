"""Failed saves without a kill: a fault at each stage on one gloo rank, a real RLIMIT_FSIZE, ENOSPC (saves.py)."""
import pytest

from reliability import saves
from reliability.common import count


@pytest.mark.timeout(300)
def test_an_exception_at_each_stage_on_one_rank():
    tally = saves.run_stage_faults(world=2)
    tally.assert_all_ok()


@pytest.mark.timeout(120)
def test_disk_full_under_a_real_rlimit_fsize():
    saves.run_fsize(count("fsize", 6)).assert_all_ok()


@pytest.mark.timeout(120)
def test_enospc_at_random_offsets():
    saves.run_enospc(count("enospc", 20)).assert_all_ok()
