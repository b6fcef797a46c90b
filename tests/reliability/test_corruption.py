"""Every file kind truncated, bit-flipped or garbled: a typed error, no hang, no silent load (corruption.py)."""
import pytest

from reliability import corruption
from reliability.common import count


@pytest.mark.timeout(300)
def test_every_damage_of_every_file_kind_is_a_typed_error():
    tally = corruption.run_corruption(offsets=count("trunc_offsets", 3), flips=count("flips", 10))
    tally.assert_all_ok()
    assert tally.figures["manager checksum"] == "xxh3"  # the default catches every flipped bit and truncation


@pytest.mark.timeout(300)
def test_sha256_steps_catch_the_same_damage():
    tally = corruption.run_corruption(offsets=1, flips=count("flips", 10) // 2, seed=1, checksum="sha256")
    tally.assert_all_ok()
    assert tally.figures["manager checksum"] == "sha256"


def test_the_larger_step_is_read_on_several_threads(monkeypatch):
    from ckptmgr.format import checksum
    split = []
    real = checksum.read_pieces
    monkeypatch.setattr(checksum, "read_pieces", lambda *args: (split.append(len(args[2])), real(*args))[1])
    tally = corruption.run_corruption(offsets=0, flips=1)
    tally.assert_all_ok()
    assert split, "no restore of the scenario took the several-threads path"
