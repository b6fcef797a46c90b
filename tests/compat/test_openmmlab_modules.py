"""Issue 19, points 3 and 4 (wrappers, missing prefixes), and how a state dict is found in a file.

mmcv: ``MODULE_WRAPPERS = Registry('module wrapper')`` (mmcv/parallel/registry.py:6-8),
``is_module_wrapper`` checks the registry and its children (mmcv/parallel/utils.py:7-32);
mmengine: ``MODEL_WRAPPERS`` (mmengine/registry/root.py:33), ``is_model_wrapper``
(mmengine/model/wrappers/utils.py:7-30). Neither requires an ``nn.Module``.
"""
import subprocess
import sys
import types
import uuid
from collections import OrderedDict

import pytest
import torch
from torch import nn

import ckptmgr
from ckptmgr import errors
from ckptmgr.state import modules
from tests.compat.upstream import Model, PlainWrapper


@pytest.fixture
def plain_wrapper():
    ckptmgr.register_module_wrapper(PlainWrapper)
    yield PlainWrapper
    modules._WRAPPERS.pop(PlainWrapper, None)


# --------------------------------------------------------------------------- point 3: wrappers of any class


def test_p3_register_module_wrapper_accepts_any_class_with_module(plain_wrapper):
    model = Model()
    wrapped = plain_wrapper(model)
    assert ckptmgr.is_module_wrapper(wrapped)
    assert ckptmgr.unwrap_model(wrapped) is model
    assert list(ckptmgr.get_state_dict(wrapped)) == list(model.state_dict())


def test_p3_save_and_load_through_a_plain_wrapper(plain_wrapper, tmp_path):
    """mmcv suite test_load_classes_name: the wrapped model's CLASSES go into meta."""
    model = Model()
    model.CLASSES = ("class1", "class2")
    path = tmp_path / "x.pth"
    ckptmgr.save_checkpoint(plain_wrapper(model), str(path))
    checkpoint = ckptmgr.load_checkpoint(plain_wrapper(Model()), str(path))
    assert checkpoint["meta"]["CLASSES"] == ("class1", "class2")


def test_p3_wrappers_registered_in_mmengine_model_wrappers_are_recognised():
    pytest.importorskip("mmengine")
    from mmengine.registry import MODEL_WRAPPERS, Registry

    def init(self, module):
        self.module = module

    name = f"CompatWrapper{uuid.uuid4().hex[:8]}"
    top = type(name, (), {"__init__": init})
    child_registry = Registry("model_wrapper", parent=MODEL_WRAPPERS, scope=f"compat{uuid.uuid4().hex[:8]}")
    child = type(name + "Child", (), {"__init__": init})
    MODEL_WRAPPERS.register_module(module=top)
    child_registry.register_module(module=child)
    try:
        for cls in (top, child):  # child registries count too (mmengine/model/wrappers/utils.py:26-30)
            model = Model()
            assert ckptmgr.is_module_wrapper(cls(model))
            assert list(ckptmgr.get_state_dict(cls(model))) == list(model.state_dict())
    finally:
        MODEL_WRAPPERS._module_dict.pop(name, None)
        MODEL_WRAPPERS._children.pop(child_registry.scope, None)


class _FakeRegistry:
    """mmcv's Registry surface that is_module_wrapper reads: module_dict and children."""

    def __init__(self):
        self.module_dict, self.children = {}, {}


@pytest.fixture
def fake_mmcv(monkeypatch):
    """mmcv 1.x is not installed here: a stand-in with its registry in sys.modules (mmcv.parallel)."""
    registry = _FakeRegistry()
    mmcv, parallel, reg_mod = (types.ModuleType(n) for n in ("mmcv", "mmcv.parallel", "mmcv.parallel.registry"))
    reg_mod.MODULE_WRAPPERS = parallel.MODULE_WRAPPERS = registry
    mmcv.parallel, parallel.registry = parallel, reg_mod
    for mod in (mmcv, parallel, reg_mod):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return registry


def test_p3_wrappers_registered_in_mmcv_module_wrappers_are_recognised(fake_mmcv):
    class MMCVWrapper(PlainWrapper):
        pass

    class ChildWrapper(PlainWrapper):
        pass

    child = _FakeRegistry()
    fake_mmcv.children["mmdet"] = child
    fake_mmcv.module_dict["MMCVWrapper"] = MMCVWrapper
    child.module_dict["ChildWrapper"] = ChildWrapper
    model = Model()
    assert ckptmgr.is_module_wrapper(MMCVWrapper(model))
    assert list(ckptmgr.get_state_dict(ChildWrapper(model))) == list(model.state_dict())
    assert not ckptmgr.is_module_wrapper(PlainWrapper(model))  # not registered anywhere


def test_p3_fsdp_subclasses_in_upstream_registries_are_not_peeled(fake_mmcv):
    """FSDP keeps flat parameters behind .module; its state dict needs FSDP's own machinery."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from ckptmgr.state.openmmlab import upstream_wrapper_classes

    class MMFullyShardedDataParallel(FullyShardedDataParallel):
        pass

    fake_mmcv.module_dict["MMFullyShardedDataParallel"] = MMFullyShardedDataParallel
    fake_mmcv.module_dict["PlainWrapper"] = PlainWrapper
    found = upstream_wrapper_classes()
    assert PlainWrapper in found and MMFullyShardedDataParallel not in found


def test_p3_guard_upstream_packages_are_never_imported_for_wrapper_checks():
    code = ("import sys, torch, ckptmgr\n"
            "m = torch.nn.Linear(2, 2)\n"
            "ckptmgr.is_module_wrapper(m); ckptmgr.unwrap_model(torch.nn.DataParallel(m)); ckptmgr.get_state_dict(m)\n"
            "bad = [n for n in ('mmengine', 'mmcv') if n in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_p3_guard_register_module_wrapper_rejects_non_classes():
    with pytest.raises(TypeError):
        ckptmgr.register_module_wrapper(PlainWrapper(None))


# --------------------------------------------------------------------------- point 4: a missing prefix
# mmengine/runner/checkpoint.py:581, mmcv/runner/checkpoint.py:608:
#     assert state_dict, f'{prefix} is not in the pretrained model'


def test_p4_a_missing_prefix_is_an_assertion_error_and_a_checkpoint_error(tmp_path):
    path = tmp_path / "m.pth"
    torch.save(Model().state_dict(), path)
    with pytest.raises(AssertionError) as info:
        ckptmgr.load_checkpoint_with_prefix("back", str(path))
    assert isinstance(info.value, errors.PrefixNotFoundError) and isinstance(info.value, ckptmgr.CheckpointFormatError)
    assert "back is not in the pretrained model" in str(info.value)
    assert "block, conv" in str(info.value)  # still lists the prefixes that exist


# --------------------------------------------------------------------------- finding the state dict


def test_a_file_without_a_dict_is_also_a_runtime_error(tmp_path):
    """mmengine/runner/checkpoint.py:637-640, mmcv :639-642: RuntimeError('No state_dict found ...')."""
    path = tmp_path / "t.pth"
    torch.save(torch.ones(3), path)
    with pytest.raises(RuntimeError, match="No state_dict found") as info:
        ckptmgr.load_checkpoint(Model(), str(path))
    assert isinstance(info.value, errors.NoStateDictError) and isinstance(info.value, ckptmgr.CheckpointFormatError)


def test_an_empty_state_dict_loads_into_a_model_without_parameters(tmp_path):
    """Upstream takes checkpoint['state_dict'] whatever it holds (mmengine :592-595, mmcv :644-647)."""
    path = tmp_path / "empty.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": OrderedDict()}, path)
    checkpoint = ckptmgr.load_checkpoint(nn.Sequential(nn.ReLU()), str(path), strict=True)
    assert checkpoint["meta"] == {"epoch": 1}


def test_weights_to_cpu_reaches_nested_tensors():
    """mmengine's weights_to_cpu applies .cpu() through nested containers (mmengine checkpoint.py:646-660)."""
    import collections
    Pair = collections.namedtuple("Pair", "a b")
    weight = nn.Parameter(torch.ones(2))
    out = ckptmgr.weights_to_cpu(OrderedDict(top=weight, nested={"inner": [weight, (weight, 1)]},
                                             pair=Pair(weight, "x")))
    leaves = [out["top"], out["nested"]["inner"][0], out["nested"]["inner"][1][0], out["pair"].a]
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" and not t.requires_grad for t in leaves)
    assert isinstance(out["pair"], Pair) and out["pair"].b == "x" and out["nested"]["inner"][1][1] == 1
