"""Model-zoo schemes, served through CKPTMGR_URL_MIRRORS by the local HTTP server.

The real zoo files carry a torch.hub hash in their names that a small test file
cannot match, so these tests pass ``check_hash=False`` (the documented opt-out);
``test_zoo_downloads_are_hash_checked`` shows the check is on by default.
"""
import io
import json
import os
import urllib.parse

import pytest
import torch

import ckptmgr
from ckptmgr.errors import CheckpointFormatError, CheckpointNotFoundError, ChecksumError
from ckptmgr.hub import zoo


@pytest.fixture
def mirror(http_server, monkeypatch):
    """Mirror download.pytorch.org and download.openmmlab.com to the test server; returns ``serve(url, obj)``."""
    monkeypatch.setenv("CKPTMGR_URL_MIRRORS",
                       f"https://download.pytorch.org/={http_server.url('/pt/')},"
                       f"https://download.openmmlab.com/={http_server.url('/mm/')}")

    def serve(original_url, obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        path = urllib.parse.urlsplit(original_url).path
        prefix = "/pt" if "pytorch.org" in original_url else "/mm"
        http_server.add(prefix + path, buf.getvalue())
        return prefix + path
    serve.server = http_server
    return serve


def weights(value=1.0):
    return {"conv.weight": torch.full((2, 3), value), "fc.bias": torch.zeros(2)}


def load(uri, **kwargs):
    return ckptmgr.CheckpointLoader.load_checkpoint(uri, **kwargs)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_old_name_is_imagenet1k_v1(mirror):
    url = zoo.resolve_torchvision("resnet50")
    assert url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    path = mirror(url, weights(1.0))
    ckpt = load("torchvision://resnet50", check_hash=False, map_location="cpu")
    assert torch.equal(ckpt["conv.weight"], torch.full((2, 3), 1.0))
    assert mirror.server.gets(path) == 1


def test_modelzoo_is_deprecated_but_works(mirror):
    mirror(zoo.resolve_torchvision("resnet50"), weights(2.0))
    with pytest.warns(DeprecationWarning, match="torchvision://resnet50"):
        ckpt = load("modelzoo://resnet50", check_hash=False)
    assert ckpt["conv.weight"][0, 0] == 2.0


def test_torchvision_explicit_enum_name(mirror):
    url = zoo.resolve_torchvision("ResNet50_Weights.IMAGENET1K_V2")
    assert url.endswith("/resnet50-11ad3fa6.pth") and url != zoo.resolve_torchvision("resnet50")
    mirror(url, weights(3.0))
    assert load("torchvision://ResNet50_Weights.IMAGENET1K_V2", check_hash=False)["conv.weight"][0, 0] == 3.0


def test_zoo_downloads_are_hash_checked(mirror):
    mirror(zoo.resolve_torchvision("resnet50"), weights())
    with pytest.raises(ChecksumError, match="0676ba61"):
        load("torchvision://resnet50")
    assert os.listdir(ckptmgr.hub.cache.cache_dir()) == []


def test_torchvision_old_names_and_aliases():
    assert zoo.resolve_torchvision("vgg16").endswith("/vgg16-397923af.pth")
    assert zoo.resolve_torchvision("inception_v3_google") == zoo.resolve_torchvision("inception_v3")
    assert zoo.resolve_torchvision("shufflenetv2_x1.0") == zoo.resolve_torchvision("shufflenet_v2_x1_0")
    assert zoo.resolve_torchvision("vit_h_14")  # no IMAGENET1K_V1: falls back to the default weights


@pytest.mark.parametrize("name,suggested", [
    ("resnt50", "resnet50"),
    ("ResNet50_Weights.IMAGENET1K_V9", "ResNet50_Weights.IMAGENET1K_V2"),
])
def test_torchvision_unknown_names_list_close_matches(name, suggested):
    with pytest.raises(CheckpointNotFoundError, match="close matches") as info:
        load(f"torchvision://{name}")
    assert suggested in str(info.value)


# --------------------------------------------------------------------------- open-mmlab


def test_open_mmlab_bundled_entry(mirror):
    url = zoo.resolve_zoo_name("open-mmlab", "resnet50_v1c")
    assert url == "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"
    path = mirror(url, {"state_dict": weights(4.0)})
    assert load("open-mmlab://resnet50_v1c", check_hash=False)["state_dict"]["conv.weight"][0, 0] == 4.0
    assert load("openmmlab://resnet50_v1c", check_hash=False)["state_dict"]["conv.weight"][0, 0] == 4.0
    assert mirror.server.gets(path) == 1  # both spellings share one cached file


def test_open_mmlab_user_table_overrides_and_extends(mirror, monkeypatch):
    home = os.environ["CKPTMGR_HOME"]
    with open(os.path.join(home, "open_mmlab.json"), "w") as fh:
        json.dump({"resnet50_v1c": "https://download.openmmlab.com/custom/r50.pth",
                   "my_net": "https://download.openmmlab.com/custom/mine.pth"}, fh)
    mirror("https://download.openmmlab.com/custom/r50.pth", {"state_dict": weights(5.0)})
    mirror("https://download.openmmlab.com/custom/mine.pth", {"state_dict": weights(6.0)})
    assert load("open-mmlab://resnet50_v1c")["state_dict"]["conv.weight"][0, 0] == 5.0
    assert load("open-mmlab://my_net")["state_dict"]["conv.weight"][0, 0] == 6.0
    assert zoo.resolve_zoo_name("open-mmlab", "vgg16_caffe").startswith("https://download.openmmlab.com/")
    model = torch.nn.Module()
    model.conv = torch.nn.Linear(3, 2, bias=False)  # state dict keys conv.weight (2x3) ...
    model.fc = torch.nn.Module()
    model.fc.bias = torch.nn.Parameter(torch.ones(2))  # ... and fc.bias (2)
    ckptmgr.load_checkpoint(model, "open-mmlab://my_net", strict=True)  # the public API, end to end
    assert model.conv.weight[0, 0] == 6.0


def test_open_mmlab_deprecated_name_warns_and_redirects(mirror):
    new_url = zoo.resolve_zoo_name("open-mmlab", "detectron/resnet50_caffe")
    mirror(new_url, {"state_dict": weights(7.0)})
    with pytest.warns(DeprecationWarning, match="detectron/resnet50_caffe"):
        ckpt = load("open-mmlab://resnet50_caffe", check_hash=False)
    assert ckpt["state_dict"]["conv.weight"][0, 0] == 7.0


def test_open_mmlab_local_path_is_relative_to_home():
    home = os.environ["CKPTMGR_HOME"]
    os.makedirs(os.path.join(home, "weights"))
    torch.save({"state_dict": weights(8.0)}, os.path.join(home, "weights", "local.pth"))
    with open(os.path.join(home, "open_mmlab.json"), "w") as fh:
        json.dump({"local_net": "weights/local.pth", "gone": "weights/missing.pth"}, fh)
    assert zoo.resolve_zoo_name("open-mmlab", "local_net") == os.path.join(home, "weights", "local.pth")
    assert load("open-mmlab://local_net")["state_dict"]["conv.weight"][0, 0] == 8.0
    with pytest.raises(CheckpointNotFoundError):
        load("open-mmlab://gone")


def test_open_mmlab_unknown_name_lists_close_matches():
    with pytest.raises(CheckpointNotFoundError, match="resnet50_v1c"):
        load("open-mmlab://resnet50_v1")


def test_broken_user_table_is_reported():
    with open(os.path.join(os.environ["CKPTMGR_HOME"], "open_mmlab.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(CheckpointFormatError, match="open_mmlab.json"):
        load("open-mmlab://resnet50_v1c")
    with open(os.path.join(os.environ["CKPTMGR_HOME"], "open_mmlab.json"), "w") as fh:
        json.dump({"x": 1}, fh)
    with pytest.raises(CheckpointFormatError):
        load("open-mmlab://x")


# --------------------------------------------------------------------------- mmcls


def classifier():
    return {"meta": {"epoch": 100},
            "state_dict": {"backbone.conv.weight": torch.ones(2, 3), "backbone.layer1.0.bias": torch.ones(4),
                           "head.fc.weight": torch.ones(10, 2)}}


def test_mmcls_keeps_only_the_backbone(mirror):
    url = zoo.resolve_zoo_name("mmcls", "resnet50")
    assert url.startswith("https://download.openmmlab.com/mmclassification/")
    mirror(url, classifier())
    ckpt = load("mmcls://resnet50", check_hash=False)
    assert set(ckpt) == {"state_dict"}
    assert list(ckpt["state_dict"]) == ["conv.weight", "layer1.0.bias"]


def test_mmcls_user_table_and_missing_backbone(mirror):
    with open(os.path.join(os.environ["CKPTMGR_HOME"], "mmcls.json"), "w") as fh:
        json.dump({"tiny": "https://download.openmmlab.com/cls/tiny.pth",
                   "headonly": "https://download.openmmlab.com/cls/head.pth"}, fh)
    mirror("https://download.openmmlab.com/cls/tiny.pth", classifier())
    mirror("https://download.openmmlab.com/cls/head.pth", {"state_dict": {"head.w": torch.ones(1)}})
    assert list(load("mmcls://tiny")["state_dict"]) == ["conv.weight", "layer1.0.bias"]
    with pytest.raises(CheckpointFormatError, match="backbone"):
        load("mmcls://headonly")
    with pytest.raises(CheckpointNotFoundError, match="tiny"):
        load("mmcls://tinny")


def test_functional_load_checkpoint_forwards_loader_options(mirror):
    mirror(zoo.resolve_torchvision("resnet50"), {"weight": torch.full((2, 3), 4.0), "bias": torch.zeros(2)})
    model = torch.nn.Linear(3, 2)
    ckptmgr.load_checkpoint(model, "torchvision://resnet50", strict=True, check_hash=False)
    assert torch.equal(model.weight.detach(), torch.full((2, 3), 4.0))
