"""CheckpointManager(checksum=...): xxh3 by default, sha256 on request, each step read with the checksum it names."""
import json
import os

import pytest
import torch

import ckptmgr
from ckptmgr import CheckpointManager
from ckptmgr.errors import ChecksumError
from ckptmgr.format.checksum import digest_of
from ckptmgr.sharded import dcp_io
from tests.manager.helpers import assert_same
from tests.sharded._workers import plain_model


def _manifest(directory, step):
    with open(os.path.join(directory, f"step_{step:08d}", "manifest.json")) as fh:
        return json.load(fh)


def _trained():
    torch.manual_seed(0)
    model = plain_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    return model, opt


def _files_match_their_digests(directory, step):
    manifest = _manifest(directory, step)
    name = manifest.get("checksum", "sha256")
    for file, entry in manifest["files"].items():
        with open(os.path.join(directory, f"step_{step:08d}", file), "rb") as fh:
            assert entry[name] == digest_of(fh.read(), name), file
    return name


def test_an_unknown_checksum_is_a_value_error_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="'xxh3', 'sha256'.*'crc32'"):
        CheckpointManager(str(tmp_path), checksum="crc32")


def test_steps_of_either_checksum_restore_side_by_side(tmp_path):
    directory = str(tmp_path / "run")
    model, opt = _trained()
    with CheckpointManager(directory, checksum="sha256") as mgr:
        mgr.save(1, model=model, optimizer=opt)
    saved_1 = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    with CheckpointManager(directory) as mgr:  # the default
        mgr.save(2, model=model, optimizer=opt)
    assert _files_match_their_digests(directory, 1) == "sha256" and _manifest(directory, 1)["format_version"] == 1
    assert _files_match_their_digests(directory, 2) == "xxh3" and _manifest(directory, 2)["format_version"] == 2
    fresh = plain_model()
    with CheckpointManager(directory) as mgr:
        assert mgr.restore(1, model=fresh).step == 1
        assert_same(saved_1, fresh.state_dict())
        assert mgr.restore(model=fresh).step == 2
    assert_same(model.state_dict(), fresh.state_dict())
    loaded = ckptmgr.load_checkpoint(plain_model(), os.path.join(directory, "step_00000001"))
    assert_same(saved_1, loaded["state_dict"])


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_a_flipped_bit_is_caught_by_the_checksum_the_manifest_names(tmp_path, checksum):
    directory = str(tmp_path / "run")
    model, opt = _trained()
    with CheckpointManager(directory, checksum=checksum) as mgr:
        mgr.save(1, model=model, optimizer=opt)
    path = os.path.join(directory, "step_00000001", "optimizer.safetensors")
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) - 3)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ChecksumError, match=f"optimizer.safetensors has {checksum}"):
        CheckpointManager(directory).restore(1, model=plain_model(), optimizer=opt)


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_dcp_files_are_hashed_while_written_not_read_back(tmp_path, monkeypatch, checksum):
    def no_second_pass(*args, **kwargs):
        raise AssertionError("a DCP file was read back to hash it")
    monkeypatch.setattr(dcp_io, "hash_files", no_second_pass)
    directory = str(tmp_path / "run")
    model, opt = _trained()
    with CheckpointManager(directory, sharded=True, checksum=checksum) as mgr:
        mgr.save(1, model=model, optimizer=opt)
    assert _files_match_their_digests(directory, 1) == checksum
    names = _manifest(directory, 1)["files"]
    assert "dcp.metadata" in names and any(n.endswith(".distcp") for n in names)
    fresh = plain_model()
    assert CheckpointManager(directory).restore(model=fresh, optimizer=torch.optim.AdamW(fresh.parameters())).step == 1
    assert_same(model.state_dict(), fresh.state_dict())


def _large():
    """A model and AdamW state whose files are each past SPLIT_FROM, so restores read them on several threads."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1536), torch.nn.Linear(1536, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
@pytest.mark.parametrize("in_place", [True, False])
def test_large_files_are_read_on_several_threads_and_still_verified(tmp_path, monkeypatch, checksum, in_place):
    from ckptmgr.format import checksum as checksums
    split = []
    real = checksums.read_pieces
    monkeypatch.setattr(checksums, "read_pieces", lambda fd, start, pieces, landed, n, segments=None: (
        split.append(sum(len(view) for _, view in pieces)), real(fd, start, pieces, landed, max(n, 2), segments))[1])
    directory = str(tmp_path / "run")
    model, opt = _large()
    with CheckpointManager(directory, checksum=checksum) as mgr:
        mgr.save(1, model=model, optimizer=opt)
    fresh, _ = _large()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with CheckpointManager(directory) as mgr:
        assert mgr.restore(model=fresh, optimizer=fresh_opt, in_place=in_place).step == 1
    assert len(split) == 2 and min(split) >= checksums.SPLIT_FROM  # the weights and the moments
    assert_same(model.state_dict(), fresh.state_dict())
    assert_same(opt.state_dict()["state"], fresh_opt.state_dict()["state"])
    for name, where in (("model.safetensors", 0.5), ("optimizer.safetensors", 0.77)):
        path = os.path.join(directory, "step_00000001", name)
        with open(path, "r+b") as fh:  # one bit, deep inside the part another thread reads
            fh.seek(int(os.path.getsize(path) * where))
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(ChecksumError, match=f"{name} has {checksum}"):
            CheckpointManager(directory).restore(1, model=fresh, optimizer=fresh_opt, in_place=in_place)
        with open(path, "r+b") as fh:
            fh.seek(int(os.path.getsize(path) * where))
            fh.write(byte)


class _Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight, large enough to be read on several threads."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(2048, 1024)
        self.head = torch.nn.Linear(1024, 2048, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("damaged", ["emb.weight", "head.weight"])
def test_either_copy_of_a_tied_weight_damaged_is_caught_when_read_in_place(tmp_path, damaged):
    from ckptmgr.format.safetensors import read_safetensors_header
    directory = str(tmp_path / "run")
    torch.manual_seed(0)
    model = _Tied()
    with CheckpointManager(directory) as mgr:
        mgr.save(1, model=model)
    path = os.path.join(directory, "step_00000001", "model.safetensors")
    with open(path, "rb") as fh:
        header, data_start = read_safetensors_header(fh)
    start, end = header[damaged]["data_offsets"]
    with open(path, "r+b") as fh:  # both copies are stored; damage one in its middle
        fh.seek(data_start + (start + end) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x04]))
    fresh = _Tied()
    with pytest.raises(ChecksumError, match="model.safetensors has xxh3"):
        CheckpointManager(directory).restore(1, model=fresh, in_place=True)
    with open(path, "r+b") as fh:
        fh.seek(data_start + (start + end) // 2)
        fh.write(byte)
    with CheckpointManager(directory) as mgr:
        assert mgr.restore(1, model=fresh, in_place=True).step == 1
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)
