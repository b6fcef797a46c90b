"""The tiered scenario, small counts: kills in the local commit, the upload and retention; wiped and damaged tiers."""
import pytest

from reliability import tiered
from reliability.common import new_bucket

pytestmark = pytest.mark.timeout(300)

POINTS = ["tier.after_local_commit", "upload.before_manifest", "tier.after_local_delete"]


def test_kills_leave_only_committed_steps_and_the_restart_uploads_what_was_local(s3, moto_server):
    tiered.run_tiered_kills(1, 1, f"s3://{new_bucket(moto_server)}", points=POINTS).assert_all_ok()


def test_wiped_and_damaged_local_tiers_restore_the_newest_step_from_s3(s3, moto_server):
    tally = tiered.run_tiered_damage(2, f"s3://{new_bucket(moto_server)}")
    tally.assert_all_ok()
    assert tally.figures["same_step_from_persistent"] == 2
