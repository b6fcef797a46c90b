"""The run's retention policy travels with the run: recorded in every manifest, adopted by a bare manager."""
import json
import logging
import os
import shutil

import pytest
from torch import nn

from ckptmgr import CheckpointManager

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1")


def _manifest(run, step):
    with open(os.path.join(run, f"step_{step:08d}", "manifest.json")) as fh:
        return json.load(fh)


def test_every_manifest_records_the_settings(ckpt_dir):
    with CheckpointManager(ckpt_dir, max_to_keep=3, keep_every_n_steps=10, best_metric="acc", best_mode="max",
                           keep_best=2) as mgr:
        mgr.save(1, model=nn.Linear(2, 2), metrics={"acc": 0.5})
    assert _manifest(ckpt_dir, 1)["retention"] == {"max_to_keep": 3, "keep_every_n_steps": 10, "best_metric": "acc",
                                                   "best_mode": "max", "keep_best": 2}
    with CheckpointManager(ckpt_dir) as bare:
        bare.save(2, model=nn.Linear(2, 2), metrics={"acc": 0.6})
    assert _manifest(ckpt_dir, 2)["retention"]["max_to_keep"] == 3   # adopted, and recorded again


def test_a_bare_manager_adopts_the_recorded_policy_instead_of_keeping_5(ckpt_dir, caplog):
    model = nn.Linear(2, 2)
    with CheckpointManager(ckpt_dir, max_to_keep=None, best_metric="loss", keep_best=1) as job:
        for step in range(1, 8):
            job.save(step, model=model, metrics={"loss": 1.0 / step if step != 2 else 0.0})
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        with CheckpointManager(ckpt_dir) as bare:             # opened to restore, then saves once
            bare.restore(model=model)
            assert bare.best_step() == 2                      # its best_metric is the run's
            bare.save(8, model=model, metrics={"loss": 0.5})
            assert bare.all_steps() == list(range(1, 9))      # not the 5 newest
    assert any("recorded with the run" in r.getMessage() for r in caplog.records)


def test_explicit_arguments_win_and_the_change_is_logged(ckpt_dir, caplog):
    model = nn.Linear(2, 2)
    with CheckpointManager(ckpt_dir, max_to_keep=None) as job:
        for step in range(1, 5):
            job.save(step, model=model)
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        with CheckpointManager(ckpt_dir, max_to_keep=2) as mgr:
            mgr.save(5, model=model)
            assert mgr.all_steps() == [4, 5]
    assert any("changes from all" in r.getMessage() and "to last 2" in r.getMessage() for r in caplog.records)
    assert _manifest(ckpt_dir, 5)["retention"]["max_to_keep"] == 2


def test_a_0_1_directory_without_a_record_keeps_working_with_the_defaults(tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURE, "run"), run)
    assert "retention" not in _manifest(run, 3)
    mgr = CheckpointManager(run)
    assert mgr.keeping.settings.max_to_keep == 5 and mgr.all_steps() == [2, 3]


@pytest.mark.parametrize("bad", [{"max_to_keep": 0}, {"best_mode": "sideways"}, "not a dict"])
def test_a_damaged_record_is_ignored(bad):
    from ckptmgr.retention import RetentionSettings, resolve_settings
    assert RetentionSettings.from_json(bad if isinstance(bad, dict) else None) is None
    assert resolve_settings(None, bad if isinstance(bad, dict) else None, "x") == RetentionSettings()
