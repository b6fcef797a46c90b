"""What a run is told: throughput of saves and restores, a progress bar on a terminal, and warnings about runs
that are probably not what their author meant (each said once)."""
import io
import logging

from torch import nn

import ckptmgr
from ckptmgr import CheckpointHook, CheckpointManager
from ckptmgr.step import progress


def _messages(caplog, level=logging.WARNING):
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_save_and_restore_log_size_and_throughput(ckpt_dir, caplog):
    model = nn.Linear(64, 64)
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        with CheckpointManager(ckpt_dir) as mgr:
            mgr.save(1, model=model)
            mgr.restore(model=model)
    infos = _messages(caplog, logging.INFO)
    committed = [m for m in infos if m.startswith("committed checkpoint step 1")]
    restored = [m for m in infos if m.startswith("restored checkpoint step 1")]
    assert committed and "KiB in" in committed[0] and "/s)" in committed[0]
    assert restored and "KiB in" in restored[0] and "/s)" in restored[0]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_progress_bar_on_a_terminal_only(ckpt_dir, monkeypatch):
    monkeypatch.setattr(progress, "BAR_DELAY", 0)  # show it at once (the default waits 2 s so quick saves are quiet)
    terminal, pipe = _Terminal(), io.StringIO()
    model = nn.Linear(256, 256)
    with CheckpointManager(ckpt_dir) as mgr:
        monkeypatch.setattr("sys.stderr", pipe)
        mgr.save(1, model=model)
        monkeypatch.setattr("sys.stderr", terminal)
        mgr.save(2, model=model)
        mgr.restore(model=model)
    assert pipe.getvalue() == ""
    assert "saving step 2" in terminal.getvalue() and "restoring" in terminal.getvalue()


def test_a_missing_best_metric_is_said_once(ckpt_dir, caplog):
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        with CheckpointManager(ckpt_dir, best_metric="val_loss", keep_best=1) as mgr:
            mgr.save(1, model=model, metrics={"loss": 0.3})
            mgr.save(2, model=model, metrics={"loss": 0.2})
    said = [m for m in _messages(caplog) if "'val_loss' is not among the metrics" in m]
    assert len(said) == 1 and "loss" in said[0] and "keep_best=1" in said[0]


def test_saving_below_the_latest_step_warns_and_retention_still_behaves(ckpt_dir, caplog):
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        with CheckpointManager(ckpt_dir, max_to_keep=2) as mgr:
            mgr.save(10, model=model)
            mgr.save(20, model=model)
            assert not _messages(caplog)
            mgr.save(5, model=model)                     # a loop that restarted its counter
            assert mgr.all_steps() == [5, 10, 20]        # the step just saved is never dropped
            mgr.save(30, model=model)
            assert mgr.all_steps() == [20, 30]
    said = [m for m in _messages(caplog) if "below the latest committed step 20" in m]
    assert len(said) == 1


def test_nothing_to_resume_says_why(tmp_path, caplog):
    model = nn.Linear(2, 2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        assert ckptmgr.resume_from_latest(str(tmp_path / "typo"), model=model) == 0
        assert ckptmgr.resume_from_latest(str(foreign), model=model) == 0
        with CheckpointManager(str(tmp_path / "fresh")) as mgr:
            hook = CheckpointHook(mgr, model=model, save_on_signals=())
            assert hook.resume() == 0
    said = _messages(caplog)
    assert any("typo is empty or does not exist yet" in m and "step 0" in m for m in said)
    assert any("none of them a checkpoint" in m for m in said)
    assert any("fresh is empty or does not exist yet" in m for m in said)
