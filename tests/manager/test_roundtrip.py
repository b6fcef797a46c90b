"""Bit-exact round trips of everything a CheckpointManager saves."""
import json
import logging
import os
import random

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import ckptmgr
from ckptmgr import CheckpointFormatError, CheckpointManager, KeyMismatchError
from tests.conftest import ConvNet
from tests.manager.helpers import SmallNet, assert_same


def _train(model, optimizers, steps=3, scaler=None):
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        for opt in optimizers:
            if scaler:
                scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad()
        if scaler:
            scaler.update()


def test_model_with_batchnorm_round_trips(ckpt_dir, convnet):
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, model=convnet)
        fresh = ConvNet()
        restored = mgr.restore(model=fresh)
    assert restored.step == 1
    assert_same(convnet.state_dict(), fresh.state_dict())
    assert int(fresh.bn.num_batches_tracked) == 1


def test_weights_file_is_plain_safetensors_with_bare_keys(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=nn.DataParallel(convnet))
    weights = safetensors.torch.load_file(os.path.join(ckpt_dir, "step_00000001", "model.safetensors"))
    assert_same(dict(convnet.state_dict()), weights)
    wrapped = nn.DataParallel(ConvNet())
    mgr.restore(model=wrapped)
    assert_same(convnet.state_dict(), wrapped.module.state_dict())


def test_sgd_momentum_and_adamw_in_a_dict(ckpt_dir, convnet):
    def optimizers(model):
        return {"sgd": torch.optim.SGD(list(model.conv.parameters()) + list(model.bn.parameters()),
                                       lr=0.05, momentum=0.9, nesterov=True),
                "adamw": torch.optim.AdamW(model.head.parameters(), lr=1e-3, betas=(0.8, 0.95))}
    opts = optimizers(convnet)
    _train(convnet, opts.values())
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(3, model=convnet, optimizer=opts)
    fresh = ConvNet()
    fresh_opts = optimizers(fresh)
    mgr.restore(model=fresh, optimizer=fresh_opts)
    for name in opts:
        assert_same(opts[name].state_dict(), fresh_opts[name].state_dict(), name)
    assert isinstance(fresh_opts["adamw"].state_dict()["state"][0]["step"], torch.Tensor)
    torch.manual_seed(5)
    _train(convnet, opts.values(), steps=2)
    torch.manual_seed(5)
    _train(fresh, fresh_opts.values(), steps=2)
    assert_same(convnet.state_dict(), fresh.state_dict())


def test_single_optimizer_and_shape_mismatches(ckpt_dir, convnet):
    opt = torch.optim.AdamW(convnet.parameters(), lr=1e-3)
    _train(convnet, [opt])
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet, optimizer=opt)
    fresh = ConvNet()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    mgr.restore(model=fresh, optimizer=fresh_opt)
    assert_same(opt.state_dict(), fresh_opt.state_dict())
    with pytest.raises(CheckpointFormatError, match="saved as one object"):
        mgr.restore(model=fresh, optimizer={"adamw": fresh_opt})
    with pytest.raises(CheckpointFormatError, match="no scheduler state"):
        mgr.restore(model=fresh, scheduler=torch.optim.lr_scheduler.StepLR(fresh_opt, 2))
    mgr.restore(model=fresh, scheduler=torch.optim.lr_scheduler.StepLR(fresh_opt, 2), strict=False)


def test_missing_optimizer_name_is_reported(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet, optimizer={"g": torch.optim.SGD(convnet.parameters(), lr=0.1)})
    with pytest.raises(CheckpointFormatError, match=r"no optimizer state for \['d'\]"):
        mgr.restore(model=convnet, optimizer={"d": torch.optim.SGD(convnet.parameters(), lr=0.1)})


def _schedulers(model):
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    plain = torch.optim.SGD(model.parameters(), lr=0.2)

    def warmup(epoch):  # a plain function: its state is not stored, the code is recreated
        return min(1.0, (epoch + 1) / 4)
    scheds = {"step": torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5),
              "onecycle": torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=0.1, total_steps=20),
              "lambda": torch.optim.lr_scheduler.LambdaLR(plain, warmup)}
    return {"sgd": sgd, "adam": adam, "plain": plain}, scheds


def test_step_onecycle_lambda_schedulers_in_a_dict(ckpt_dir, convnet):
    opts, scheds = _schedulers(convnet)
    for _ in range(5):
        for o in opts.values():
            o.step()
        for s in scheds.values():
            s.step()
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(5, model=convnet, optimizer=opts, scheduler=scheds)
    fresh_opts, fresh_scheds = _schedulers(ConvNet())
    mgr.restore(model=ConvNet(), optimizer=fresh_opts, scheduler=fresh_scheds)
    for name in scheds:
        assert_same(scheds[name].state_dict(), fresh_scheds[name].state_dict(), name)
    for name in opts:
        assert_same(opts[name].state_dict()["param_groups"], fresh_opts[name].state_dict()["param_groups"], name)
    for _ in range(3):
        for group in (opts, fresh_opts):
            for o in group.values():
                o.step()
        for group in (scheds, fresh_scheds):
            for s in group.values():
                s.step()
        for name in scheds:
            assert scheds[name].get_last_lr() == fresh_scheds[name].get_last_lr(), name


def test_single_scheduler(ckpt_dir, convnet):
    opt = torch.optim.SGD(convnet.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    for _ in range(3):
        opt.step()
        sched.step()
    CheckpointManager(ckpt_dir).save(3, model=convnet, optimizer=opt, scheduler=sched)
    opt2 = torch.optim.SGD(convnet.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.9)
    CheckpointManager(ckpt_dir).restore(model=convnet, optimizer=opt2, scheduler=sched2)
    assert_same(sched.state_dict(), sched2.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


class _Schedule:
    """A callable-object lambda whose __dict__ mixes storable and unstorable state."""

    def __init__(self):
        self.factor = 0.5
        self.callback = lambda: None

    def __call__(self, epoch):
        return self.factor ** epoch


def test_lambda_object_keeps_storable_state_and_drops_the_rest(ckpt_dir, convnet, caplog):
    opt = torch.optim.SGD(convnet.parameters(), lr=0.1)
    fn = _Schedule()
    fn.factor = 0.25
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    with caplog.at_level(logging.WARNING, logger="ckptmgr.state"):
        CheckpointManager(ckpt_dir).save(1, model=convnet, optimizer=opt, scheduler=sched)
    assert "callback" in caplog.text
    fn2 = _Schedule()
    sched2 = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(convnet.parameters(), lr=0.1), fn2)
    CheckpointManager(ckpt_dir).restore(model=convnet, scheduler=sched2)
    assert fn2.factor == 0.25 and callable(fn2.callback)


def test_grad_scaler(ckpt_dir, convnet):
    opt = torch.optim.SGD(convnet.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=2)
    _train(convnet, [opt], steps=5, scaler=scaler)   # grows the scale and advances the growth tracker
    convnet.conv.weight.grad = torch.full_like(convnet.conv.weight, float("inf"))
    scaler.step(opt)
    scaler.update()                                  # and one backoff
    saved = scaler.state_dict()
    assert saved["scale"] != 2.0 ** 4 and saved != torch.amp.GradScaler("cpu").state_dict()
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet, optimizer=opt, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    mgr.restore(model=convnet, scaler=fresh)
    assert fresh.state_dict() == saved
    assert fresh.get_scale() == scaler.get_scale()


def test_rng_streams_continue_exactly(ckpt_dir, convnet):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)
    expected = torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], torch.randn(3)
    torch.rand(100)
    np.random.rand(100)
    random.random()
    mgr.restore(model=convnet)
    got = torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], torch.randn(3)
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    assert torch.equal(expected[3], got[3])


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n, "history": torch.arange(self.n)}

    def load_state_dict(self, state):
        self.n = state["n"]
        self.history = state["history"]


def test_extra_metrics_meta_and_result(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    extra = {"epoch": 3, "best": {"acc": 0.75, "tags": ["a", "b"]}, "counter": Counter(4),
             "mask": torch.tensor([True, False])}
    path = mgr.save(30, model=convnet, extra=extra, metrics={"loss": torch.tensor(0.25), "acc": np.float64(0.5)},
                    meta={"config": {"lr": 0.1}, "note": "run 1"})
    counter = Counter()
    result = mgr.restore(model=convnet, extra={"counter": counter})
    assert result.step == 30 and result.path == path == os.path.join(ckpt_dir, "step_00000030")
    assert result.extra["epoch"] == 3 and result.extra["best"] == {"acc": 0.75, "tags": ["a", "b"]}
    assert result.extra["counter"] is counter and counter.n == 4 and torch.equal(counter.history, torch.arange(4))
    assert torch.equal(result.extra["mask"], extra["mask"])
    assert result.metrics == {"loss": 0.25, "acc": 0.5}
    assert result.meta["user"] == {"config": {"lr": 0.1}, "note": "run 1"}
    assert result.meta["ckptmgr_version"] == ckptmgr.__version__
    assert result.meta["torch_version"] == torch.__version__ and result.meta["world_size"] == 1
    assert "time" in result.meta
    without = mgr.restore(model=convnet)           # no objects passed: the saved state comes back as data
    assert without.extra["counter"]["n"] == 4


def test_strict_model_loading(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=convnet)
    other = SmallNet()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(KeyMismatchError):
        mgr.restore(model=other)
    assert_same(before, other.state_dict())  # a strict mismatch is found before anything is read into the model
    mgr.restore(model=other, strict=False)
    # only what matches in name and shape is loaded: here the scalar bn.num_batches_tracked
    before["bn.num_batches_tracked"] = convnet.state_dict()["bn.num_batches_tracked"]
    assert_same(before, other.state_dict())


def test_manifest_records_files_metrics_and_components(ckpt_dir, convnet):
    mgr = CheckpointManager(ckpt_dir)
    opt = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    _train(convnet, [opt], steps=1)
    mgr.save(7, model=convnet, optimizer=opt, extra={"epoch": 1}, metrics={"loss": float("nan"), "acc": 1})
    step_dir = os.path.join(ckpt_dir, "step_00000007")
    with open(os.path.join(step_dir, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert manifest["checksum"] == "xxh3" and manifest["format_version"] == 2   # the default; sha256 stays version 1
    assert manifest["metrics"] == {"loss": None, "acc": 1}
    assert set(manifest["files"]) == set(os.listdir(step_dir)) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert os.path.getsize(os.path.join(step_dir, name)) == entry["size"]
    assert manifest["components"]["rng"] == {"0": "rng-rank00000.safetensors"}
    assert manifest["components"]["optimizer"] == "optimizer.safetensors"   # it holds tensors
    assert manifest["components"]["extra"] == "extra.json"                   # it does not


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_and_cuda_rng(ckpt_dir):
    torch.manual_seed(0)
    model = ConvNet().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8, device="cuda")).sum().backward()
    opt.step()
    torch.cuda.manual_seed(3)
    mgr = CheckpointManager(ckpt_dir)
    mgr.save(1, model=model, optimizer=opt)
    expected = torch.rand(4, device="cuda")
    torch.rand(10, device="cuda")
    fresh = ConvNet().cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    mgr.restore(model=fresh, optimizer=fresh_opt, map_location="cuda")
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert_same(model.state_dict(), fresh.state_dict())
    assert_same(opt.state_dict(), fresh_opt.state_dict())
    cpu = ConvNet()
    mgr.restore(model=cpu, map_location="cpu")
    assert_same({k: v.cpu() for k, v in model.state_dict().items()}, cpu.state_dict())
