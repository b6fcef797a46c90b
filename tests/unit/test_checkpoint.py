"""save_checkpoint / load_checkpoint / load_checkpoint_with_prefix (issue 2)."""
import io
import logging
import os
import pickle

import pytest
import torch
from torch import nn

import ckptmgr
from ckptmgr import CheckpointFormatError, UnsafeCheckpointError
from ckptmgr.format import checkpoint_file as checkpoint_module
from tests.conftest import ConvNet


def _equal_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_layout_and_plain_torch_load(tmp_path, convnet):
    convnet.CLASSES = ("cat", "dog")
    opt = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9)
    convnet(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "deep" / "dir" / "ckpt.pth"  # parents are created
    ckptmgr.save_checkpoint(nn.DataParallel(convnet), str(path), optimizer=opt, meta={"epoch": 3})
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"meta", "state_dict", "optimizer"}
    assert ckpt["meta"]["epoch"] == 3
    assert ckpt["meta"]["ckptmgr_version"] == ckptmgr.__version__
    assert isinstance(ckpt["meta"]["time"], str)
    assert ckpt["meta"]["CLASSES"] == ("cat", "dog")  # found through the wrapper
    _equal_state(ckpt["state_dict"], convnet.state_dict())
    assert ckpt["optimizer"]["state"][0]["momentum_buffer"].shape == convnet.conv.weight.shape


def test_save_dict_of_optimizers_and_meta_type(tmp_path, convnet):
    opts = {"gen": torch.optim.Adam(convnet.conv.parameters()),
            "disc": torch.optim.SGD(convnet.head.parameters(), lr=1)}
    path = str(tmp_path / "gan.pth")
    ckptmgr.save_checkpoint(convnet, path, optimizer=opts)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt["optimizer"]) == {"gen", "disc"}
    assert ckpt["optimizer"]["disc"]["param_groups"][0]["lr"] == 1
    with pytest.raises(TypeError):
        ckptmgr.save_checkpoint(convnet, path, meta=["not", "a", "dict"])
    with pytest.raises(TypeError):
        ckptmgr.save_checkpoint(convnet, path, optimizer="sgd")


def test_round_trip_pth_and_safetensors(tmp_path, convnet):
    for name in ("model.pth", "model.safetensors"):
        path = str(tmp_path / name)
        ckptmgr.save_checkpoint(convnet, path, optimizer=torch.optim.Adam(convnet.parameters()), meta={"k": 1.5})
        fresh = ConvNet()
        ckpt = ckptmgr.load_checkpoint(fresh, path, strict=True)
        _equal_state(fresh.state_dict(), convnet.state_dict())
        assert ckpt["meta"]["k"] == 1.5
        assert "optimizer" in ckpt


def test_safetensors_detected_by_magic_and_library_interop(tmp_path, convnet):
    from safetensors.torch import load_file, save_file
    lib_file = tmp_path / "weights.bin"  # no telling extension: sniffed from the bytes
    save_file({k: v.contiguous() for k, v in convnet.state_dict().items()}, str(lib_file))
    fresh = ConvNet()
    ckptmgr.load_checkpoint(fresh, str(lib_file), strict=True)
    _equal_state(fresh.state_dict(), convnet.state_dict())
    ours = tmp_path / "ours.safetensors"
    ckptmgr.save_checkpoint(convnet, str(ours))
    loaded = load_file(str(ours))  # the reference reader accepts our writer's files, keys as the model's
    _equal_state(loaded, convnet.state_dict())


def test_bare_state_dict_and_revise_keys(tmp_path, convnet):
    path = tmp_path / "bare.pth"
    torch.save(nn.DataParallel(convnet).state_dict(), path)  # 'module.'-prefixed, as DDP users saved them
    fresh = ConvNet()
    ckptmgr.load_checkpoint(fresh, str(path), strict=True)  # default rule strips 'module.'
    _equal_state(fresh.state_dict(), convnet.state_dict())
    # rules apply in order: the second sees what the first produced
    torch.save({"backbone.conv.weight": convnet.conv.weight.detach()}, path)
    target = nn.Module()
    target.stem = nn.Module()
    target.stem.conv = nn.Conv2d(3, 4, 3, padding=1)
    ckptmgr.load_checkpoint(target, str(path), strict=False,
                            revise_keys=[(r"^backbone\.", "trunk."), (r"^trunk\.", "stem.")])
    assert torch.equal(target.stem.conv.weight, convnet.conv.weight)


def test_file_without_state_dict_raises(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(CheckpointFormatError, match="epoch"):
        ckptmgr.load_checkpoint(ConvNet(), str(path))


def test_load_with_prefix(tmp_path, convnet):
    wrapper = nn.Module()
    wrapper.backbone = convnet
    wrapper.neck = nn.Linear(2, 2)
    path = str(tmp_path / "full.pth")
    ckptmgr.save_checkpoint(wrapper, path)
    for prefix in ("backbone", "backbone."):
        sub = ckptmgr.load_checkpoint_with_prefix(prefix, path)
        _equal_state(sub, convnet.state_dict())
    with pytest.raises(CheckpointFormatError) as info:
        ckptmgr.load_checkpoint_with_prefix("head", path)
    assert "backbone" in str(info.value) and "neck" in str(info.value)


def test_memory_url_round_trip(convnet):
    url = "memory://ckptmgr-tests/run/model.pth"
    ckptmgr.save_checkpoint(convnet, url, meta={"where": "memory"})
    fresh = ConvNet()
    assert ckptmgr.load_checkpoint(fresh, url, strict=True)["meta"]["where"] == "memory"
    _equal_state(fresh.state_dict(), convnet.state_dict())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("target", ["local", "memory"])
def test_failed_save_leaves_previous_file_byte_identical(tmp_path, convnet, monkeypatch, target):
    url = str(tmp_path / "ckpt.pth") if target == "local" else "memory://ckptmgr-tests/atomic/ckpt.pth"
    ckptmgr.save_checkpoint(convnet, url, meta={"version": "old"})
    import fsspec
    with fsspec.open(url, "rb") as fh:
        before = fh.read()

    def half_then_fail(obj, fileobj):
        fileobj.write(b"PK\x03\x04 half a checkpoint")
        raise _Boom("serializer died mid-save")

    monkeypatch.setattr(checkpoint_module, "save_torch", half_then_fail)
    with pytest.raises(_Boom):
        ckptmgr.save_checkpoint(convnet, url, meta={"version": "new"})
    with fsspec.open(url, "rb") as fh:
        assert fh.read() == before
    if target == "local":
        assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temp file left behind
    else:
        fs = fsspec.filesystem("memory")
        assert fs.ls("/ckptmgr-tests/atomic", detail=False) == ["/ckptmgr-tests/atomic/ckpt.pth"]


class _Canary:
    """Unpickling this would create a file: proof that pickle code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unsafe_pickle_is_rejected_and_never_runs(tmp_path, caplog):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"weight": torch.zeros(1, 1)}, "payload": _Canary(str(canary))}, path)
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True"):
        ckptmgr.CheckpointLoader.load_checkpoint(str(path))
    # Only the weights are wanted: the payload is skipped (named in a warning), never run.
    with caplog.at_level(logging.WARNING, logger="ckptmgr"):
        ckpt = ckptmgr.load_checkpoint(nn.Linear(1, 1), str(path), logger="silent")
    assert "payload" not in ckpt and any("payload" in r.getMessage() for r in caplog.records)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"state_dict": _Canary(str(canary))}))
    with pytest.raises(UnsafeCheckpointError):
        ckptmgr.CheckpointLoader.load_checkpoint(str(raw))
    assert not canary.exists()


def test_trust_pickle_is_an_explicit_opt_in(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": {"weight": torch.ones(1, 1), "bias": torch.zeros(1)}, "cfg": io.StringIO("x")}, path)
    model = nn.Linear(1, 1)
    ckpt = ckptmgr.load_checkpoint(model, str(path), strict=True, trust_pickle=True)
    assert ckpt["cfg"].getvalue() == "x"
    assert torch.equal(model.weight.detach(), torch.ones(1, 1))


@pytest.mark.parametrize("content", [b"", b"garbage bytes" * 10, None])
def test_corrupt_files_raise_typed_errors(tmp_path, convnet, content):
    path = tmp_path / "bad.pth"
    if content is None:  # a real checkpoint cut in half
        ckptmgr.save_checkpoint(convnet, str(path))
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ckptmgr.CorruptCheckpointError):
        ckptmgr.load_checkpoint(ConvNet(), str(path))


def test_missing_file_is_typed(tmp_path):
    with pytest.raises(ckptmgr.CheckpointNotFoundError):
        ckptmgr.load_checkpoint(ConvNet(), str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError):  # also what OpenMMLab users catch
        ckptmgr.load_checkpoint(ConvNet(), str(tmp_path / "nope.pth"))


def test_torch_compile_keys_load_strictly_by_default(tmp_path, convnet):
    path = tmp_path / "compiled.pth"
    torch.save(torch.compile(convnet).state_dict(), path)  # keys start with '_orig_mod.'
    fresh = ConvNet()
    ckptmgr.load_checkpoint(fresh, str(path), strict=True)
    _equal_state(fresh.state_dict(), convnet.state_dict())
    torch.save({"state_dict": nn.DataParallel(torch.compile(convnet)).state_dict()}, path)  # module._orig_mod.
    other = ConvNet()
    ckptmgr.load_checkpoint(other, str(path), strict=True)
    _equal_state(other.state_dict(), convnet.state_dict())
    assert set(ckptmgr.load_checkpoint_with_prefix("module.conv", str(path))) == {"weight", "bias"}


def test_a_load_that_matches_nothing_is_an_error_and_a_partial_one_names_the_counts(tmp_path, convnet, caplog):
    path = tmp_path / "prefixed.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in convnet.state_dict().items()}}, path)
    fresh = ConvNet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ckptmgr.KeyMismatchError, match="none of the 9 entries") as info:
        ckptmgr.load_checkpoint(fresh, str(path))           # strict=False, the OpenMMLab default
    assert "backbone" in str(info.value) and "revise_keys" in info.value.hint
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    ckptmgr.load_checkpoint(fresh, str(path), revise_keys=[(r"^backbone\.", "")], strict=True)
    partial = tmp_path / "partial.pth"
    torch.save({"state_dict": {k: v for k, v in convnet.state_dict().items() if k.startswith("head.")}}, partial)
    with caplog.at_level("WARNING"):
        report_ckpt = ckptmgr.load_checkpoint(ConvNet(), str(partial))
    assert report_ckpt is not None
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("MOST OF THE MODEL WAS NOT LOADED: loaded 2 of the model's 9 entries (6 missing" in m for m in said)
