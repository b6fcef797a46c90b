"""Every file kind truncated, bit-flipped or garbled: a typed error, no hang, no silent load (corruption.py)."""
import pytest

from reliability import corruption
from reliability.common import count


@pytest.mark.timeout(300)
def test_every_damage_of_every_file_kind_is_a_typed_error():
    tally = corruption.run_corruption(offsets=count("trunc_offsets", 3), flips=count("flips", 10))
    tally.assert_all_ok()
