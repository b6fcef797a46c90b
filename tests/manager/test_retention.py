"""Retention policies as pure functions over synthetic checkpoint lists."""
import pytest

from ckptmgr.retention import (
    AnyOf,
    CheckpointInfo,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepLast,
    best_of,
    build_policy,
    steps_to_delete,
)


def infos(steps, metrics=None):
    metrics = metrics or {}
    return [CheckpointInfo(s, metrics.get(s, {})) for s in steps]


def kept(policy, ckpts, protected=()):
    return sorted({c.step for c in ckpts} - set(steps_to_delete(ckpts, policy, protected)))


def test_keep_last_keeps_the_highest_steps_whatever_the_order():
    assert kept(KeepLast(3), infos([5, 1, 9, 3, 7])) == [5, 7, 9]
    assert kept(KeepLast(10), infos([1, 2])) == [1, 2]
    assert kept(KeepLast(1), infos([])) == []


def test_keep_every_n_steps():
    assert kept(KeepEvery(1000), infos(range(0, 5001, 500))) == [0, 1000, 2000, 3000, 4000, 5000]


def test_keep_best_min_and_max_ignore_missing_and_non_finite():
    losses = {1: {"loss": 0.5}, 2: {"loss": 0.1}, 3: {}, 4: {"loss": float("nan")}, 5: {"loss": 0.3},
              6: {"loss": None}, 7: {"loss": "low"}, 8: {"loss": True}}
    ckpts = infos(range(1, 9), losses)
    assert kept(KeepBest("loss", 2, "min"), ckpts) == [2, 5]
    assert kept(KeepBest("loss", 1, "max"), ckpts) == [1]
    assert kept(KeepBest("loss", 10), ckpts) == [1, 2, 5]   # 3, 4, 6, 7, 8 never count as best
    assert best_of(ckpts, "loss", "min") == [2, 5, 1]
    assert best_of(ckpts, "acc") == []


def test_best_ties_go_to_the_newer_step():
    ckpts = infos([1, 2, 3], {1: {"acc": 0.9}, 2: {"acc": 0.9}, 3: {"acc": 0.1}})
    assert best_of(ckpts, "acc", "max") == [2, 1, 3]


def test_policies_combine_any_of():
    metrics = {s: {"loss": abs(s - 4) + 0.5} for s in range(1, 13)}   # best at step 4, then 3 and 5
    ckpts = infos(range(1, 13), metrics)
    policy = build_policy(max_to_keep=2, keep_every_n_steps=5, best_metric="loss", best_mode="min", keep_best=1)
    assert kept(policy, ckpts) == [4, 5, 10, 11, 12]
    assert kept(AnyOf((KeepLast(1), KeepEvery(6))), ckpts) == [6, 12]


def test_protected_steps_survive_any_policy():
    ckpts = infos([1, 2, 3, 4])
    assert kept(KeepLast(1), ckpts, protected=[2]) == [2, 4]
    assert steps_to_delete(ckpts, KeepLast(1)) == [1, 2, 3]   # oldest first


def test_keep_all_and_none():
    assert kept(KeepAll(), infos([1, 2, 3])) == [1, 2, 3]
    assert kept(build_policy(max_to_keep=None), infos(range(50))) == list(range(50))


@pytest.mark.parametrize("kwargs", [dict(max_to_keep=0), dict(max_to_keep=-1), dict(max_to_keep=True),
                                    dict(keep_every_n_steps=0), dict(best_mode="lowest"),
                                    dict(keep_best=-1), dict(keep_best=2), dict(max_to_keep=2.5)])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        build_policy(**kwargs)
