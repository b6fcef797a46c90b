"""Two managers on one S3 prefix (a real moto server) racing to commit the same step: exactly one wins.

The lease alone cannot decide this race: a job whose last lease check passed
just before another job took the directory over still writes its manifest.
The rounds below force exactly that interleaving: job A runs until it is
about to write its manifest (its lease check passed), then job B starts,
takes the lease over, writes its files and reaches its manifest too; both
manifests are then PUT at the same instant. The create-only PUT must let
exactly one through, and the step must restore with the winner's values.
(moto decides the race; see tests/support/s3cond.py for why its conditional
PUTs are serialised here.)
"""
import threading

import pytest
import s3fs

from ckptmgr import CheckpointExistsError, CheckpointManager, DirectoryInUseError
from ckptmgr.io import conditional
from ckptmgr.io.remote import FsspecStore
from tests.conftest import ConvNet
from tests.manager.helpers import filled
from tests.support.s3cond import atomic_conditional_puts

pytestmark = pytest.mark.timeout(600)
ROUNDS = 50


def _model(value):
    return filled(ConvNet(), value)


class _Interleave:
    """Holds A at its manifest write until B is at its own; then both PUT at once."""

    def __init__(self):
        self.a_waiting = threading.Event()
        self.barrier = threading.Barrier(2, timeout=60)

    def install(self, monkeypatch):
        real = FsspecStore.create_exclusive

        def create_exclusive(store, name, data):
            if name.endswith("manifest.json"):
                if threading.current_thread().name == "job-a":
                    self.a_waiting.set()
                self.barrier.wait()
            return real(store, name, data)
        monkeypatch.setattr(FsspecStore, "create_exclusive", create_exclusive)


def _race(url, step, interleave):
    outcome = {}

    def job(name, value, wait_for=None):
        if wait_for is not None:
            assert wait_for.wait(timeout=60), "job A never reached its manifest"
        mgr = CheckpointManager(url, max_to_keep=None)
        try:
            mgr.save(step, model=_model(value))
            outcome[name] = ("won", value)
        except (CheckpointExistsError, DirectoryInUseError) as exc:
            outcome[name] = ("lost", type(exc).__name__)
        except BaseException as exc:  # reported below
            outcome[name] = ("error", repr(exc))
            interleave.barrier.abort()
        finally:
            mgr.close()
    a = threading.Thread(target=job, name="job-a", args=("a", step * 10 + 1))
    b = threading.Thread(target=job, name="job-b", args=("b", step * 10 + 2, interleave.a_waiting))
    a.start()
    b.start()
    a.join(timeout=120)
    b.join(timeout=120)
    return outcome


def test_two_managers_racing_for_one_step_exactly_one_commits(s3, monkeypatch):
    atomic_conditional_puts(monkeypatch)  # moto's own check is not atomic under load; S3's is
    url = f"{s3}/shared"
    lost = {"CheckpointExistsError": 0, "DirectoryInUseError": 0}
    winners = {"a": 0, "b": 0}
    for step in range(1, ROUNDS + 1):
        interleave = _Interleave()
        with monkeypatch.context() as patch:
            interleave.install(patch)
            outcome = _race(url, step, interleave)
        results = sorted(kind for kind, _ in outcome.values())
        assert results == ["lost", "won"], f"round {step}: {outcome}"
        winner = next(name for name, (kind, _) in outcome.items() if kind == "won")
        winners[winner] += 1
        lost[next(detail for kind, detail in outcome.values() if kind == "lost")] += 1
        fresh = ConvNet()
        restored = CheckpointManager(url).restore(step, model=fresh)
        assert restored.step == step
        assert float(fresh.conv.weight.detach().flatten()[0]) == outcome[winner][1], f"round {step}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        revisions = {p.split("/")[-2] for p in fs.find(f"{url[5:]}/step_{step:08d}") if "/rev-" in p}
        assert len(revisions) == 1, f"round {step}: the loser's files are left: {revisions}"
    assert sum(winners.values()) == ROUNDS
    print(f"winners {winners}, losers' errors {lost}")


def test_with_a_plain_manifest_put_the_same_race_commits_twice(s3, monkeypatch):
    """The control: with the manifest written by a plain PUT (the commit before conditional writes), the
    same interleaving lets both saves report success, the first one's step silently replaced."""
    monkeypatch.setattr(conditional, "supported", lambda store: False)
    monkeypatch.setattr(FsspecStore, "create_exclusive", lambda store, name, data: store.write_bytes(name, data))
    interleave = _Interleave()
    interleave.install(monkeypatch)
    outcome = _race(f"{s3}/control", 1, interleave)
    assert sorted(kind for kind, _ in outcome.values()) == ["won", "won"], outcome


def test_lease_takeover_is_a_compare_and_swap(s3):
    """Two jobs claiming at the same moment: the one whose read is stale by the time it writes is refused."""
    from ckptmgr.io.access import open_store
    from ckptmgr.step.ownership import OWNER_NAME, DirectoryOwner
    store = open_store(f"{s3}/lease")
    old = DirectoryOwner(store)
    old.claim()                                   # a job that ran before: B and A both take over from it
    a, b = DirectoryOwner(open_store(f"{s3}/lease")), DirectoryOwner(open_store(f"{s3}/lease"))
    read = a.store.read_tagged

    def read_then_b_claims(name):
        got = read(name)
        b.claim()                                 # B reads the same version and writes first
        return got
    a.store.read_tagged = read_then_b_claims
    with pytest.raises(DirectoryInUseError, match="at the same moment"):
        a.claim()
    b.check()                                     # B holds the lease; A never wrote over it
    assert b.token.encode() in store.read_bytes(OWNER_NAME)
    with pytest.raises(DirectoryInUseError):
        old.check()
