"""Wrapper registry, clean state dicts and reporting loads (issue 2)."""
import logging
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ckptmgr
from ckptmgr import KeyMismatchError, get_state_dict, load_state_dict, unwrap_model
from tests.conftest import ConvNet


def _same(a, b):
    assert list(a.keys()) == list(b.keys())
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def single_rank_group(tmp_path):
    """A real one-process gloo group so DistributedDataParallel can be built on the CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dataparallel_and_compile_unwrap(convnet):
    wrapped = torch.compile(nn.DataParallel(torch.compile(nn.DataParallel(convnet))))
    assert ckptmgr.is_module_wrapper(wrapped)
    assert unwrap_model(wrapped) is convnet
    _same(get_state_dict(wrapped), convnet.state_dict())
    assert not ckptmgr.is_module_wrapper(convnet)


def test_ddp_unwrap(convnet, single_rank_group):
    ddp = nn.parallel.DistributedDataParallel(convnet)
    assert unwrap_model(ddp) is convnet
    assert list(ddp.state_dict())[0].startswith("module.")
    _same(get_state_dict(ddp), convnet.state_dict())
    _same(get_state_dict(torch.compile(ddp)), convnet.state_dict())


def test_accelerate_prepared_model(convnet):
    from accelerate import Accelerator
    prepared = Accelerator(cpu=True).prepare(convnet)
    _same(get_state_dict(prepared), convnet.state_dict())
    assert unwrap_model(prepared) is convnet


def test_wrapper_nested_inside_model_gives_clean_keys():
    torch.manual_seed(0)
    plain = nn.Sequential(ConvNet(), nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    wrapped = nn.Sequential(nn.DataParallel(ConvNet()),
                            nn.Sequential(nn.Linear(3, 3), nn.DataParallel(nn.BatchNorm1d(3))))
    wrapped.load_state_dict({k: v for k, v in zip(wrapped.state_dict(), plain.state_dict().values())})
    sd = get_state_dict(torch.compile(wrapped))
    _same(sd, plain.state_dict())
    # versions of wrapped modules survive under the clean names
    assert sd._metadata["1.1"] == {"version": 2}  # BatchNorm1d._version
    assert sd._metadata["0.bn"] == {"version": 2}
    # and loading clean keys back into the wrapped tree works strictly
    target = nn.Sequential(nn.DataParallel(ConvNet()),
                           nn.Sequential(nn.Linear(3, 3), nn.DataParallel(nn.BatchNorm1d(3))))
    report = load_state_dict(target, sd, strict=True)
    assert report.ok
    _same(get_state_dict(target), plain.state_dict())


def test_state_dict_details(convnet):
    convnet.register_buffer("scratch", torch.ones(2), persistent=False)
    calls = []
    convnet.bn._register_state_dict_hook(lambda mod, sd, prefix, meta: calls.append(prefix))
    sd = get_state_dict(nn.DataParallel(convnet))
    assert "scratch" not in sd
    assert "bn.num_batches_tracked" in sd
    assert calls == ["bn."]
    assert sd._metadata["bn"]["version"] == nn.BatchNorm2d._version
    dest = OrderedDict()
    out = get_state_dict(convnet, destination=dest, prefix="backbone.")
    assert out is dest and "backbone.conv.weight" in dest
    assert "backbone.bn" in dest._metadata
    kept = get_state_dict(convnet, keep_vars=True)
    assert isinstance(kept["conv.weight"], nn.Parameter)


def test_register_custom_wrapper():
    class Holder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    model = nn.Linear(2, 2)
    assert not ckptmgr.is_module_wrapper(Holder(model))
    try:
        ckptmgr.register_module_wrapper(Holder, attr="inner")
        assert unwrap_model(nn.DataParallel(Holder(model))) is model
        with pytest.raises(KeyError):
            ckptmgr.register_module_wrapper(Holder, attr="other")

        @ckptmgr.register_module_wrapper
        class Sub(Holder):  # subclasses of a registered wrapper count too
            pass
        assert ckptmgr.is_module_wrapper(Sub(model))
        with pytest.raises(TypeError):
            ckptmgr.register_module_wrapper(42)  # any class is accepted (as upstream), not an instance
    finally:
        from ckptmgr.state import modules
        modules._WRAPPERS.pop(Holder, None)


def test_weights_to_cpu_keeps_metadata(convnet):
    sd = convnet.state_dict()
    out = ckptmgr.weights_to_cpu(sd)
    assert out._metadata == sd._metadata
    assert all(v.device.type == "cpu" for v in out.values())
    assert out["conv.weight"].data_ptr() == sd["conv.weight"].data_ptr()  # no copy for CPU tensors


def test_load_report_non_strict(convnet, caplog):
    sd = convnet.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    del sd["bn.num_batches_tracked"]
    sd["conv.weight"] = torch.zeros(7, 3, 3, 3)
    target = ConvNet()
    before = target.conv.weight.clone()
    with caplog.at_level(logging.WARNING):
        report = load_state_dict(nn.DataParallel(target), sd)
    assert report.missing_keys == ["head.bias"]
    assert report.unexpected_keys == ["extra.weight"]
    assert report.mismatched == [("conv.weight", (7, 3, 3, 3), (4, 3, 3, 3))]
    assert not report.ok
    assert torch.equal(target.conv.weight, before)  # skipped, not crashed
    assert torch.equal(target.bn.running_mean, convnet.bn.running_mean)  # the rest loaded
    assert "size mismatch for conv.weight" in caplog.text and "extra.weight" in caplog.text


def test_load_report_strict_raises_with_every_problem(convnet):
    sd = convnet.state_dict()
    sd["ghost"] = torch.zeros(1)
    del sd["head.weight"]
    sd["bn.weight"] = torch.zeros(9)
    with pytest.raises(KeyMismatchError) as info:
        load_state_dict(ConvNet(), sd, strict=True)
    assert isinstance(info.value, RuntimeError)
    text = str(info.value)
    assert "ghost" in text and "head.weight" in text and "bn.weight" in text


def test_missing_num_batches_tracked_is_not_reported(convnet):
    sd = convnet.state_dict()
    del sd["bn.num_batches_tracked"]
    assert load_state_dict(ConvNet(), sd, strict=True).ok


def test_silent_logger_and_only_rank_zero_warns(convnet, caplog):
    sd = convnet.state_dict()
    sd["ghost"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING):
        load_state_dict(ConvNet(), sd, logger="silent")
    assert caplog.text == ""
    custom = logging.getLogger("custom.test")
    with caplog.at_level(logging.WARNING, logger="custom.test"):
        load_state_dict(ConvNet(), sd, logger=custom)
    assert any(r.name == "custom.test" for r in caplog.records)


class Versioned(nn.Module):
    """Version 2 renamed the parameter 'w' to 'weight'; the upgrade runs on load."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if (local_metadata.get("version") or 1) < 2 and prefix + "w" in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(prefix + "w")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def test_version_upgrade_runs_from_metadata(tmp_path):
    old = OrderedDict([("inner.w", torch.arange(3.0))])
    old._metadata = OrderedDict([("", {"version": 1}), ("inner", {"version": 1})])
    path = tmp_path / "old.pth"
    torch.save(old, path)
    model = nn.Sequential()
    model.add_module("inner", Versioned())
    ckptmgr.load_checkpoint(nn.DataParallel(model), str(path), strict=True)
    assert torch.equal(model.inner.weight.detach(), torch.arange(3.0))
    # the metadata we write records the new version, so a new checkpoint needs no upgrade
    assert get_state_dict(model)._metadata["inner"]["version"] == 2
