"""CheckpointHook: step/epoch/time triggers, extra as a callable, resume, and preemption signals.

The signal tests send real signals to the test process (handlers are restored
afterwards); the 2-rank test runs real gloo processes where only one rank is
signalled and one rank's clock is skewed, and both must still act together.
"""
from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from torch import nn

import ckptmgr
from ckptmgr import CheckpointHook, CheckpointManager
from tests.support.multiproc import run_ranks

pytestmark = pytest.mark.timeout(120)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


class Counter:
    """A user object with state_dict/load_state_dict, as ``extra`` may hold."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def _trigger(manager: CheckpointManager, step: int) -> str:
    ckpt = ckptmgr.load_checkpoint(_model(), os.path.join(manager.directory, f"step_{step:08d}"))
    return ckpt["meta"]["user"]["trigger"]


@pytest.fixture
def manager(tmp_path):
    with CheckpointManager(tmp_path / "run", max_to_keep=None) as mgr:
        yield mgr


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_every_n_steps_saves_after_each_nth_step(manager):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointHook(manager, model=model, optimizer=opt, every_n_steps=3) as hook:
        stops = [hook.after_step(step, metrics={"loss": _train_step(model, opt)}) for step in range(10)]
    assert stops == [False] * 10
    assert manager.all_steps() == [2, 5, 8]
    assert _trigger(manager, 5) == "every_n_steps"


def test_every_n_epochs_and_no_double_save_of_one_step(manager):
    model = _model()
    with CheckpointHook(manager, model=model, every_n_steps=5, every_n_epochs=2) as hook:
        for epoch in range(4):
            for step in range(epoch * 5, epoch * 5 + 5):
                assert hook.after_step(step) is False
            assert hook.after_epoch(epoch, step) is False   # steps 9 and 19 were saved by after_step already
    assert manager.all_steps() == [4, 9, 14, 19]
    with CheckpointHook(CheckpointManager(manager.directory + "-epochs"), model=model, every_n_epochs=2) as hook:
        for epoch in range(4):
            hook.after_epoch(epoch, epoch * 5 + 4)
        assert hook.manager.all_steps() == [9, 19]
        assert _trigger(hook.manager, 9) == "every_n_epochs"


def test_every_n_seconds_counts_from_the_last_save(manager):
    model = _model()
    now = [1000.0]                               # a clock the test moves, so machine speed cannot matter
    with CheckpointHook(manager, model=model, every_n_seconds=0.5) as hook:
        hook._clock = lambda: now[0]
        hook._since = now[0]
        assert hook.after_step(0) is False
        now[0] += 0.6
        hook.after_step(1)
        now[0] += 0.4
        hook.after_step(2)                       # the timer restarted at the save of step 1
        now[0] += 0.2
        hook.after_step(3)
    assert manager.all_steps() == [1, 3]
    assert _trigger(manager, 3) == "every_n_seconds"


def test_extra_callable_is_called_at_save_time_and_restored(manager):
    model = _model()
    progress = {"epoch": 0, "calls": 0}

    def extra():
        progress["calls"] += 1
        return {"epoch": progress["epoch"], "names": ["a", "b"]}
    with CheckpointHook(manager, model=model, extra=extra, every_n_steps=2, save_on_signals=()) as hook:
        for step in range(4):
            progress["epoch"] = step * 10
            hook.after_step(step)
    assert progress["calls"] == 2                 # only when saving
    fresh = CheckpointHook(manager, model=_model(), extra=extra, save_on_signals=())
    assert fresh.resume() == 4
    assert fresh.restored.extra == {"epoch": 30, "names": ["a", "b"]}
    assert fresh.last_saved_step == 3


def test_resume_restores_objects_and_returns_the_next_step(manager):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    counter = Counter()
    assert CheckpointHook(manager, model=model, optimizer=opt, save_on_signals=()).resume() == 0
    with CheckpointHook(manager, model=model, optimizer=opt, scheduler=sched, extra={"counter": counter},
                        every_n_steps=5) as hook:
        for step in range(5):
            _train_step(model, opt)
            sched.step()
            counter.n += 1
            hook.after_step(step)
    model2 = nn.Linear(4, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2)
    counter2 = Counter()
    hook2 = CheckpointHook(manager, model=model2, optimizer=opt2, scheduler=sched2, extra={"counter": counter2})
    assert hook2.resume() == 5
    hook2.close()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert sched2.last_epoch == 5 and counter2.n == 5
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_signal_saves_this_step_returns_true_and_handlers_are_restored(manager):
    calls = []

    def previous(signum, frame):
        calls.append(signum)
    signal.signal(signal.SIGUSR1, previous)
    model = _model()
    hook = CheckpointHook(manager, model=model, every_n_steps=100, save_on_signals=(signal.SIGUSR1,))
    assert signal.getsignal(signal.SIGUSR1) == hook._on_signal
    assert [hook.after_step(s) for s in range(3)] == [False] * 3
    os.kill(os.getpid(), signal.SIGUSR1)
    assert hook.after_step(3) is True and hook.preempted
    assert calls == [signal.SIGUSR1]              # the previous Python handler still ran
    assert manager.all_steps() == [3]
    assert _trigger(manager, 3) == "preemption"
    assert hook.after_step(4) is False            # the flag was consumed
    hook.close()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_preemption_with_async_saves_returns_only_after_the_commit(tmp_path):
    manager = CheckpointManager(tmp_path / "run", max_to_keep=None, async_save=True)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointHook(manager, model=model, optimizer=opt, every_n_steps=2) as hook:
        for step in range(3):
            _train_step(model, opt)
            hook.after_step(step)
        os.kill(os.getpid(), signal.SIGTERM)
        assert hook.after_step(3) is True
        assert CheckpointManager(tmp_path / "run").all_steps() == [1, 3]   # seen by a fresh reader: committed
    manager.close()


def test_signal_at_the_epoch_end_after_a_periodic_save_of_that_step_saves_once(manager):
    hook = CheckpointHook(manager, model=_model(), every_n_steps=2, save_on_signals=[signal.SIGTERM])
    assert hook.after_step(0) is False
    assert hook.after_step(1) is False            # saves step 1
    os.kill(os.getpid(), signal.SIGTERM)
    assert hook.after_epoch(0, 1) is True         # stops, without a second save of step 1
    hook.close()
    assert manager.all_steps() == [1]
    assert _trigger(manager, 1) == "every_n_steps"


def test_hook_outside_the_main_thread_installs_no_handler(manager, caplog):
    before = signal.getsignal(signal.SIGTERM)
    made = []
    thread = threading.Thread(target=lambda: made.append(CheckpointHook(manager, model=_model())))
    thread.start()
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "outside the main thread" in caplog.text
    assert made[0].after_step(0) is False


@pytest.mark.parametrize("kwargs, error", [
    ({"every_n_steps": 0}, ValueError), ({"every_n_epochs": 1.5}, ValueError),
    ({"every_n_seconds": -1}, ValueError), ({"save_on_signals": (signal.SIGKILL,)}, ValueError),
    ({"save_on_signals": ("nope",)}, ValueError), ({"extra": 3}, TypeError),
])
def test_bad_arguments_are_rejected(manager, kwargs, error):
    with pytest.raises(error):
        CheckpointHook(manager, model=_model(), **kwargs)


def test_bad_manager_or_step_are_rejected(manager):
    with pytest.raises(TypeError):
        CheckpointHook("runs/x", model=_model())
    with CheckpointHook(manager, model=_model()) as hook:
        with pytest.raises(ValueError):
            hook.after_step(-1)
        with pytest.raises(TypeError):
            hook.after_step(1.0)
    with pytest.raises(ckptmgr.CheckpointError, match="closed"):
        hook.after_step(0)


# --------------------------------------------------------------------------- two real ranks


def _two_rank_worker(rank, world, directory):
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = DDP(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(directory, max_to_keep=None)
    hook = CheckpointHook(manager, model=model, optimizer=opt, every_n_seconds=3600)
    real = hook._clock
    decisions = []
    for step in range(10):
        torch.manual_seed(step * 10 + rank)
        _train_step(model, opt)
        # Step 1: only rank 1's clock says an hour passed (rank 0 decides: no save).
        # Step 2: rank 0's clock says so (every rank saves).
        skewed = (step == 1 and rank == 1) or (step == 2 and rank == 0)
        hook._clock = (lambda: real() + 7200) if skewed else real
        if step == 5 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)     # the signal reaches rank 1 only
        stop = hook.after_step(step)
        decisions.append(stop)
        if stop:
            break
    hook.close()
    return {"decisions": decisions, "steps": manager.all_steps(), "preempted": hook.preempted,
            "handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}


def test_two_ranks_agree_on_time_and_on_a_signal_only_one_rank_received(tmp_path):
    results = run_ranks(_two_rank_worker, 2, str(tmp_path / "run"), timeout=90,
                        env={"CKPTMGR_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"})
    for rank, (status, value) in enumerate(results):
        assert status == "ok", f"rank {rank}: {value}"
    for _, value in results:
        assert value["decisions"] == [False] * 5 + [True]
        assert value["steps"] == [2, 5]
        assert value["preempted"] and value["handler_restored"]
    assert _trigger(CheckpointManager(tmp_path / "run"), 2) == "every_n_seconds"
    assert _trigger(CheckpointManager(tmp_path / "run"), 5) == "preemption"
