"""S3 behind a fault proxy: every round trip verifies at 10 % faults; a typed error at 100 % (s3_faults.py)."""
import pytest

from reliability import s3_faults
from reliability.common import count


@pytest.mark.timeout(300)
def test_s3_through_a_faulty_network(moto_server, s3):
    tally = s3_faults.run_s3_faults(moto_server, count("s3_rounds", 2), rate=0.1)
    tally.assert_all_ok()
