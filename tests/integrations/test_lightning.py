"""CkptmgrCheckpointIO under a real Lightning Trainer (CPU): what lands on disk, verification, pickle opt-in."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle

import pytest
import torch

pytest.importorskip("lightning")

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO  # noqa: E402

import ckptmgr  # noqa: E402
from ckptmgr import cli  # noqa: E402
from ckptmgr.errors import (  # noqa: E402
    ChecksumError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnserializableStateError,
)
from ckptmgr.format.checksum import FileEntry  # noqa: E402
from ckptmgr.format.manifest import Manifest  # noqa: E402
from ckptmgr.integrations import lightning as ckl  # noqa: E402
from ckptmgr.integrations.lightning import CkptmgrCheckpointIO, load_checkpoint_dict  # noqa: E402
from tests.integrations import lit_toy as toy  # noqa: E402

EXPECTED = ["epoch=1-step=15.ckpt", "epoch=2-step=20.ckpt", "last.ckpt"]


def _steps(container):
    return sorted(os.listdir(container))


def _canary_pickle(canary: str) -> bytes:
    """A pickle that creates ``canary`` when it is loaded (what an attacker would ship)."""
    class Canary:
        def __reduce__(self):
            return (open, (canary, "w"))
    return pickle.dumps({"state": Canary()})


def _forge(step_dir: str, name: str, data: bytes, component=None, file=None) -> None:
    """Replace a file of a committed step and re-sign the manifest so sizes and checksums match."""
    from ckptmgr.format.checksum import digest_of
    with open(os.path.join(step_dir, name), "wb") as fh:
        fh.write(data)
    path = os.path.join(step_dir, "manifest.json")
    manifest = Manifest.from_bytes(open(path, "rb").read())
    manifest.files[name] = FileEntry(len(data), digest_of(data, manifest.checksum))
    if component is not None:
        manifest.components[component] = file or name
    with open(path, "wb") as fh:
        fh.write(manifest.to_bytes())


@pytest.fixture(scope="module")
def run20(tmp_path_factory):
    """The issue's run: ModelCheckpoint(top-2, last, every 5 steps) for 20 steps with the plugin."""
    directory = str(tmp_path_factory.mktemp("lit") / "ckpts")
    trainer = toy.fit(directory, 20)
    return directory, toy.weights(trainer.lightning_module)


def test_fit_leaves_only_committed_verified_checkpoints(run20, capsys):
    directory, final = run20
    assert sorted(os.listdir(directory)) == EXPECTED  # top-2 by step plus last; evicted ones gone, no temporaries
    for name in EXPECTED:
        container = os.path.join(directory, name)
        step = 20 if name == "last.ckpt" else int(name.split("step=")[1][:-5])
        assert _steps(container) == [f"step_{step:08d}"]   # exactly one committed step, nothing else
        assert cli.main(["verify", container]) == 0
        assert "all 1 intact" in capsys.readouterr().out
        ckpt = load_checkpoint_dict(container)
        assert ckpt["global_step"] == step and ckpt[ckl.VERSION_KEY]
        assert isinstance(ckpt["optimizer_states"], list) and isinstance(ckpt["lr_schedulers"], list)
        assert ckpt["hyper_parameters"]["betas"] == (0.9, 0.99)            # tuples survive, as Lightning saved them
        assert list(ckpt["optimizer_states"][0]["state"]) == [0, 1, 2, 3]  # int keys too
    last = load_checkpoint_dict(os.path.join(directory, "last.ckpt"))
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())
    model = toy.Tiny()   # the weights file is an ordinary ckptmgr step: load_checkpoint reads it as well
    ckptmgr.load_checkpoint(model, os.path.join(directory, "last.ckpt"), strict=True)
    assert toy.same(toy.weights(model), final)


def test_the_files_are_plain_formats(run20):
    directory, final = run20
    step = os.path.join(directory, "last.ckpt", "step_00000020")
    assert sorted(os.listdir(step)) == ["extra.safetensors", "manifest.json", "meta.json", "model.safetensors",
                                        "optimizer.safetensors", "scheduler.json"]
    from safetensors.torch import load_file
    weights = load_file(os.path.join(step, "model.safetensors"))   # any safetensors tool reads the weights
    assert toy.same(weights, final)
    assert json.load(open(os.path.join(step, "scheduler.json")))["states"]["0"]["step_size"] == 7


def test_a_flipped_byte_raises_checksum_error(run20, tmp_path):
    import shutil
    directory, _ = run20
    copy = str(tmp_path / "last.ckpt")
    shutil.copytree(os.path.join(directory, "last.ckpt"), copy)
    path = os.path.join(copy, "step_00000020", "optimizer.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(ChecksumError):
        CkptmgrCheckpointIO().load_checkpoint(copy)
    assert cli.main(["verify", copy]) == 1


def test_pickle_needed_is_refused_by_default_and_opt_in_round_trips(tmp_path):
    namespace = argparse.Namespace(root="/data", dtype=torch.float16)
    with pytest.raises(UnserializableStateError, match="hyper_parameters") as info:
        toy.fit(str(tmp_path / "refused"), 5, model=toy.Tiny(extra=namespace))
    assert "trust_pickle=True" in info.value.hint
    assert not os.path.exists(tmp_path / "refused" / "epoch=0-step=5.ckpt")

    directory = str(tmp_path / "trusted")
    toy.fit(directory, 5, model=toy.Tiny(extra=namespace), plugin=CkptmgrCheckpointIO(trust_pickle=True))
    path = os.path.join(directory, "last.ckpt")
    assert "pickled.pt" in os.listdir(os.path.join(path, "step_00000005"))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        CkptmgrCheckpointIO().load_checkpoint(path)                  # no opt-in: refused before unpickling
    assert CkptmgrCheckpointIO(trust_pickle=True).load_checkpoint(path)["hyper_parameters"]["extra"] == namespace
    assert CkptmgrCheckpointIO().load_checkpoint(path, weights_only=False)["hyper_parameters"]["extra"] == namespace


def test_a_pickle_canary_never_runs_without_the_opt_in(run20, tmp_path):
    import shutil
    directory, _ = run20
    canary = str(tmp_path / "canary")
    payload = _canary_pickle(canary)

    swapped = str(tmp_path / "swapped.ckpt")   # the JSON part replaced by a pickle, manifest re-signed to match
    shutil.copytree(os.path.join(directory, "last.ckpt"), swapped)
    step = os.path.join(swapped, "step_00000020")
    _forge(step, "scheduler.json", payload)
    with pytest.raises(CorruptCheckpointError):
        CkptmgrCheckpointIO().load_checkpoint(swapped)
    with pytest.raises(CorruptCheckpointError):    # a pickle file named as a component is refused by its kind
        _forge(step, "scheduler.pt", payload, component="scheduler")
        CkptmgrCheckpointIO().load_checkpoint(swapped)

    declared = str(tmp_path / "declared.ckpt")  # a forged "pickled" part: only the opt-in may read it
    shutil.copytree(os.path.join(directory, "last.ckpt"), declared)
    _forge(os.path.join(declared, "step_00000020"), "pickled.pt", payload, component="pickled")
    with pytest.raises(UnsafeCheckpointError):
        CkptmgrCheckpointIO().load_checkpoint(declared)

    legacy = str(tmp_path / "legacy.ckpt")     # a plain torch.save file: weights_only, never full pickle
    open(legacy, "wb").write(payload)
    with pytest.raises(UnsafeCheckpointError):
        CkptmgrCheckpointIO().load_checkpoint(legacy)
    assert not os.path.exists(canary)


def test_a_plain_ckpt_file_from_lightnings_own_io_loads_and_is_replaced_in_place(tmp_path):
    directory = str(tmp_path / "ckpts")
    toy.fit(directory, 10, plugin=TorchCheckpointIO())           # stock files: last.ckpt is a plain file
    assert os.path.isfile(os.path.join(directory, "last.ckpt"))
    trainer = toy.fit(directory, 15, ckpt_path="last")            # resumes from the stock file, then saves ours
    assert trainer.global_step == 15
    last = os.path.join(directory, "last.ckpt")
    assert os.path.isdir(last) and _steps(last) == ["step_00000015"]
    assert not os.path.exists(os.path.join(directory, ckl._dirckpt.TMP_DIR))
    assert load_checkpoint_dict(last)["global_step"] == 15


def test_async_wrapper_top_k_eviction_leaves_no_orphan(tmp_path, run20, monkeypatch, caplog):
    import logging
    import time
    caplog.set_level(logging.INFO, logger=ckl.__name__)
    write = ckl._dirckpt.save

    def slow_storage(*args, **kwargs):   # each save takes a while, so Lightning's async queue holds several
        time.sleep(0.3)
        write(*args, **kwargs)
    monkeypatch.setattr(ckl._dirckpt, "save", slow_storage)
    directory = str(tmp_path / "ckpts")
    trainer = toy.fit(directory, 20, plugin=AsyncCheckpointIO(CkptmgrCheckpointIO()))
    assert "now that it is saved" in caplog.text     # removals overtook their queued saves ...
    assert sorted(os.listdir(directory)) == EXPECTED   # ... and were applied once those committed
    assert toy.same(toy.weights(trainer.lightning_module), run20[1])
    for name in EXPECTED:
        assert cli.main(["verify", os.path.join(directory, name)]) == 0
    resumed = toy.fit(directory, 22, plugin=AsyncCheckpointIO(CkptmgrCheckpointIO()), ckpt_path="last")
    assert resumed.global_step == 22


def test_storage_options_must_be_a_dict(tmp_path):
    with pytest.raises(TypeError):
        CkptmgrCheckpointIO().save_checkpoint({"global_step": 1}, str(tmp_path / "x.ckpt"), storage_options=3)


def test_the_checkpoint_dict_round_trips_exactly(tmp_path):
    checkpoint = {"epoch": 0, "global_step": 3, ckl.VERSION_KEY: "2.6.6",
                  "state_dict": {"w": torch.arange(4.0)}, "optimizer_states": [{"state": {0: {"m": torch.ones(2)}},
                                                                               "param_groups": [{"params": [0]}]}],
                  "extra_key": {"nested": [1, 2.5, None, "s", (3, 4)], "inf": float("inf")}}
    plugin = CkptmgrCheckpointIO()
    plugin.save_checkpoint(checkpoint, str(tmp_path / "a.ckpt"))
    back = plugin.load_checkpoint(str(tmp_path / "a.ckpt"))
    assert list(back) == list(checkpoint)
    assert torch.equal(back["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert torch.equal(back["optimizer_states"][0]["state"][0]["m"], torch.ones(2))
    assert back["extra_key"] == checkpoint["extra_key"]
    buffer = io.BytesIO()
    torch.save(back, buffer)   # a plain dict again: Lightning's own tools can take it


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    tmp = tmp_path / ckl._dirckpt.TMP_DIR
    host = socket.gethostname()
    for pid in (dead, str(os.getppid())):
        (tmp / f"{host}-{pid}-0123456789ab" / "step_00000001").mkdir(parents=True)
    CkptmgrCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1)}},
                                          str(tmp_path / "a.ckpt"))
    assert os.listdir(tmp) == [f"{host}-{os.getppid()}-0123456789ab"]   # the live writer's is left alone
    assert _steps(tmp_path / "a.ckpt") == ["step_00000001"]


def test_foreign_directories_are_neither_written_into_nor_removed(tmp_path):
    from ckptmgr.errors import StorageError
    foreign = tmp_path / "deepspeed.ckpt"
    (foreign / "zero").mkdir(parents=True)
    plugin = CkptmgrCheckpointIO()
    with pytest.raises(StorageError, match="did not write"):
        plugin.save_checkpoint({"global_step": 1}, str(foreign))
    plugin.remove_checkpoint(str(foreign))
    assert os.listdir(foreign) == ["zero"]
