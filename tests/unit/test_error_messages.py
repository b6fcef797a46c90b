"""Errors that send users the right way: each names what happened and a fix that applies to them."""
import errno
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import ckptmgr
from ckptmgr import (
    CheckpointFormatError,
    CheckpointManager,
    ChecksumError,
    CorruptCheckpointError,
    StorageError,
    UnknownSchemeError,
    UnserializableStateError,
)
from ckptmgr.io.local import storage_error
from ckptmgr.state.objects import clean_metrics

SAVE_WHOLE_MODULE = """
import sys, torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
torch.save(Net(), sys.argv[1])
"""


def test_a_trusted_pickle_of_a_main_class_says_the_class_is_not_importable(tmp_path):
    path = str(tmp_path / "whole.pth")
    subprocess.run([sys.executable, "-c", SAVE_WHOLE_MODULE, path], check=True)
    with pytest.raises(CheckpointFormatError) as info:
        ckptmgr.load_checkpoint(nn.Linear(2, 2), path, trust_pickle=True)
    text = str(info.value)
    assert "Net" in text and "__main__" in text and "not importable here" in text
    assert "damaged" not in text and "download" not in text


def test_a_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, these are my notes\n")
    for trust in (False, True):
        with pytest.raises(CorruptCheckpointError) as info:
            ckptmgr.load_checkpoint(nn.Linear(2, 2), str(path), trust_pickle=trust)
        text = str(info.value)
        assert "is not a checkpoint" in text
        assert "file an issue" not in text.lower() and "Unpickler" not in text and "download" not in text


def test_efbig_is_a_file_size_limit_not_out_of_space():
    error = storage_error("/x/model.safetensors", OSError(errno.EFBIG, "File too large"))
    assert "file-size limit" in str(error) and "out of space" not in str(error)
    assert "out of space" in str(storage_error("/x", OSError(errno.ENOSPC, "No space left on device")))


def test_a_damaged_local_step_has_one_stop_and_no_download_advice(tmp_path):
    run = str(tmp_path / "run")
    with CheckpointManager(run) as mgr:
        mgr.save(1, model=nn.Linear(4, 4))
    path = os.path.join(run, "step_00000001", "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ChecksumError) as info:
        CheckpointManager(run).restore(1, model=nn.Linear(4, 4))
    text = str(info.value)
    assert "...." not in text and "download" not in text
    assert "model.safetensors has xxh3" in text and "verify" in text


def test_a_non_scalar_metric_is_named():
    with pytest.raises(UnserializableStateError, match="metric 'acc' must be one number"):
        clean_metrics({"loss": torch.tensor(0.5), "acc": torch.tensor([0.1, 0.2])})
    with pytest.raises(TypeError, match="metric 'acc'"):  # still a TypeError for callers that catch that
        clean_metrics({"acc": [0.1]})


def test_a_file_as_manager_directory_is_a_storage_error(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("not a directory")
    with pytest.raises(StorageError):
        CheckpointManager(str(afile)).save(1, model=nn.Linear(2, 2))
    assert afile.read_text() == "not a directory"


def test_an_unknown_scheme_is_refused_when_the_manager_is_made(tmp_path):
    with pytest.raises(UnknownSchemeError) as made:
        CheckpointManager("foo://x")
    with pytest.raises(UnknownSchemeError) as loaded:
        ckptmgr.load_checkpoint(nn.Linear(2, 2), "foo://x")
    assert "foo://" in str(made.value) and "foo://" in str(loaded.value)
