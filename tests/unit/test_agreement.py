"""agree(): one rank's failure becomes every rank's, with the original type where ckptmgr knows it."""
import pytest

from ckptmgr.distributed import agree
from ckptmgr.errors import ChecksumError
from tests.support.multiproc import run_ranks


def test_single_process_is_just_a_call():
    assert agree("phase", lambda: {"x": 1}) == [{"x": 1}]
    with pytest.raises(ValueError, match="boom"):
        agree("phase", lambda: (_ for _ in ()).throw(ValueError("boom")))


def _phase(rank, world, failing, typed):
    from ckptmgr.distributed import agree

    def work():
        if rank == failing:
            raise ChecksumError("bytes differ") if typed else KeyError("internal")
        return rank * 10
    try:
        return ["ok", agree("test phase", work)]
    except Exception as exc:
        return [type(exc).__name__, str(exc)]


def test_results_from_every_rank_in_rank_order():
    results = run_ranks(_phase, 3, -1, True)
    assert [value for _, value in results] == [["ok", [0, 10, 20]]] * 3


@pytest.mark.parametrize("typed", [True, False])
def test_an_error_on_one_rank_raises_on_every_rank(typed):
    results = run_ranks(_phase, 3, 1, typed)
    assert all(status == "ok" for status, _ in results), results
    kinds = [value[0] for _, value in results]
    assert kinds[1] == ("ChecksumError" if typed else "KeyError")              # its own exception
    others = "ChecksumError" if typed else "DistributedError"                 # typed errors keep their type
    assert kinds[0] == kinds[2] == others
    assert "failed on rank 1" in results[0][1][1] and "test phase" in results[2][1][1]
