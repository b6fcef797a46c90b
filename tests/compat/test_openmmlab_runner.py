"""Issue 19: the weights of an mmengine Runner checkpoint load without ``trust_pickle``, and no pickle code runs.

``Runner.save_checkpoint`` writes meta, state_dict, optimizer, param_schedulers
and a ``message_hub`` of ``HistoryBuffer`` objects and numpy scalars
(mmengine/runner/runner.py:2147-2275); only the message hub needs pickle. mmcv 1.x
runners keep numpy values (``hook_msgs.best_score``) in ``meta``.
"""
import io
import logging
import os
import pickle
import subprocess
import threading
import uuid

import numpy as np
import pytest
import torch
from torch import nn

import ckptmgr
from tests.compat.upstream import Model, same_weights


class _ToyDataset(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"inputs": self.x[i], "data_samples": self.y[i]}


def _toy_model():
    from mmengine.model import BaseModel

    class ToyModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            out = self.bn(self.linear(inputs))
            if mode == "loss":
                return {"loss": nn.functional.cross_entropy(out, data_samples)}
            return out

    return ToyModel()


@pytest.fixture(scope="module")
def runner_checkpoint(tmp_path_factory):
    """A real mmengine Runner checkpoint (1 epoch, CPU, tiny model): (path, trained state dict)."""
    pytest.importorskip("mmengine")
    from mmengine.runner import Runner
    logging.getLogger("mmengine").setLevel(logging.ERROR)
    work_dir = tmp_path_factory.mktemp("runner")
    runner = Runner(
        model=_toy_model(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=_ToyDataset(), sampler=dict(type="DefaultSampler", shuffle=True),
                              batch_size=4, num_workers=0, collate_fn=dict(type="default_collate")),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9)),
        param_scheduler=dict(type="MultiStepLR", milestones=[1], by_epoch=True),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)),
        experiment_name=f"compat-{uuid.uuid4().hex[:8]}", launcher="none")
    runner.train()
    state = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    return str(work_dir / "epoch_1.pth"), state


_PLAIN = (torch.Tensor, int, float, str, bool, bytes, type(None))


def _only_plain_values(obj):
    if isinstance(obj, dict):
        return all(_only_plain_values(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return all(_only_plain_values(v) for v in obj)
    return isinstance(obj, _PLAIN)


def test_runner_checkpoint_weights_load_without_trust_pickle(runner_checkpoint, caplog):
    path, trained = runner_checkpoint
    model = _toy_model()
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        checkpoint = ckptmgr.load_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert checkpoint["meta"]["epoch"] == 1 and "optimizer" in checkpoint and "param_schedulers" in checkpoint
    assert _only_plain_values(checkpoint)  # what needed pickle is gone
    warned = [r.getMessage() for r in caplog.records if "message_hub" in r.getMessage()]
    assert len(warned) == 1 and "trust_pickle=True" in warned[0]


def test_runner_checkpoint_prefix_load_without_trust_pickle(runner_checkpoint):
    path, trained = runner_checkpoint
    linear = ckptmgr.load_checkpoint_with_prefix("linear", path)
    assert torch.equal(linear["weight"], trained["linear.weight"])


def test_runner_checkpoint_guard_the_whole_file_still_needs_trust_pickle(runner_checkpoint):
    path, _ = runner_checkpoint
    with pytest.raises(ckptmgr.UnsafeCheckpointError):
        ckptmgr.CheckpointLoader.load_checkpoint(path)
    checkpoint = ckptmgr.CheckpointLoader.load_checkpoint(path, trust_pickle=True)
    assert type(checkpoint["message_hub"]["log_scalars"]["train/loss"]).__name__ == "HistoryBuffer"


def test_numpy_values_in_meta_cost_only_those_values(tmp_path):
    """mmdet's init_detector reads meta['CLASSES'] after load_checkpoint: skipping is per leaf."""
    model = Model()
    path = tmp_path / "mmcv_runner.pth"
    torch.save({"meta": {"CLASSES": ("a", "b"), "epoch": 12, "hook_msgs": {"best_score": np.float64(0.5), "k": 1}},
                "state_dict": model.state_dict()}, path)
    fresh = Model()
    checkpoint = ckptmgr.load_checkpoint(fresh, str(path))
    assert same_weights(fresh, model)
    assert checkpoint["meta"] == {"CLASSES": ("a", "b"), "epoch": 12, "hook_msgs": {"k": 1}}


class _Payload:
    """Unpickling this calls ``func(*args)``: creating the canary file proves pickle code ran."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(canary):
    return {
        "builtins.eval": _Payload(eval, (f"open({str(canary)!r}, 'w').close()",)),
        "builtins.exec": _Payload(exec, (f"open({str(canary)!r}, 'w').close()",)),
        "subprocess.call": _Payload(subprocess.call, (["touch", str(canary)],)),
        "os.system": _Payload(os.system, (f"touch {canary}",)),
    }


@pytest.mark.parametrize("name", ["builtins.eval", "builtins.exec", "subprocess.call", "os.system"])
@pytest.mark.parametrize("where", ["beside the weights", "inside the weights", "in the module versions",
                                   "the whole file"])
def test_hostile_payloads_are_skipped_or_refused_never_run(tmp_path, name, where):
    canary = tmp_path / "canary"
    payload = _payloads(canary)[name]
    allowed_before = set(torch.serialization.get_safe_globals())
    weights = Model().state_dict()
    versioned = Model().state_dict()
    versioned._metadata["block"] = payload  # state_dict._metadata reaches _load_from_state_dict
    obj = {"beside the weights": {"meta": {}, "state_dict": weights, "message_hub": {"x": payload}},
           "inside the weights": {"state_dict": dict(weights, extra=payload)},
           "in the module versions": {"state_dict": versioned},
           "the whole file": payload}[where]
    path = tmp_path / "hostile.pth"
    torch.save(obj, path)
    if where == "beside the weights" and name != "os.system":
        checkpoint = ckptmgr.load_checkpoint(Model(), str(path))  # skipped: an inert stand-in, then removed
        assert checkpoint["message_hub"] == {}
    else:  # the weights need it, or torch blocks the module outright
        with pytest.raises(ckptmgr.UnsafeCheckpointError):
            ckptmgr.load_checkpoint(Model(), str(path))
    assert not canary.exists()
    assert set(torch.serialization.get_safe_globals()) == allowed_before  # no stand-in left registered


class _GatedFile(io.BytesIO):
    """A file whose reads pause while a stand-in session is active, until the test releases them."""

    def __init__(self, data, in_session, release):
        super().__init__(data)
        self.in_session, self.release = in_session, release

    def _gate(self):
        from ckptmgr.format import pickled
        if pickled._state["active"] and not self.in_session.is_set():
            self.in_session.set()
            if not self.release.wait(120):
                raise TimeoutError("the test never released the gated read")

    def read(self, *args):
        self._gate()
        return super().read(*args)

    def readinto(self, buffer):
        self._gate()
        return super().readinto(buffer)


def test_other_loads_during_a_stand_in_session_still_refuse_pickle(tmp_path):
    """torch's allowed globals are process-wide: while one load holds stand-ins, ckptmgr's other loads check
    their result, so a file needing pickle is still refused (a bare torch.load would get an inert stand-in)."""
    from ckptmgr.format import pickled
    path = tmp_path / "numpy_meta.pth"
    torch.save({"meta": {"score": np.float64(0.5)}, "state_dict": Model().state_dict()}, path)
    in_session, release = threading.Event(), threading.Event()
    gated = _GatedFile(path.read_bytes(), in_session, release)
    result = {}

    def skip_load():
        try:
            result["checkpoint"] = pickled.load_skipping_pickled(gated, 0, None, "gated")
        except BaseException as exc:  # reported to the main thread below
            result["error"] = exc

    thread = threading.Thread(target=skip_load)
    thread.start()
    try:
        assert in_session.wait(120), "the stand-in session never started"
        with pytest.raises(ckptmgr.UnsafeCheckpointError):
            ckptmgr.CheckpointLoader.load_checkpoint(str(path))
        bare = torch.load(path, weights_only=True)  # the documented caveat: inert, no code ran
        assert isinstance(bare["meta"]["score"], pickled.SkippedObject)
    finally:
        release.set()
        thread.join(120)
    assert "error" not in result and "score" not in result["checkpoint"]["meta"]
    with pytest.raises(pickle.UnpicklingError):  # session over: torch refuses numpy again
        torch.load(path, weights_only=True)
