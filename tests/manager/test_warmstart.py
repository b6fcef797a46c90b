"""Warm start (init_from): a fresh run loads weights from a file, another run on S3 or a URL; later runs resume."""
from __future__ import annotations

import io
import logging
import os

import pytest
import torch

import ckptmgr
from ckptmgr.errors import CheckpointNotFoundError
from tests.manager.helpers import SmallNet, assert_same


def _source(seed: int = 7) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet()
    model.train()
    model(torch.randn(4, 8))  # BN statistics away from their defaults
    return model


def _fresh() -> SmallNet:
    torch.manual_seed(1000)
    return SmallNet()


def _train_step(model, opt):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()


def _check_resumes_from_own_step(directory: str, init_from: str, source: SmallNet, caplog) -> None:
    """First run: warm start (returns 0), train, save. Second run: resumes from the step, not the source."""
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    assert ckptmgr.resume_from_latest(directory, model=model, optimizer=opt, init_from=init_from) == 0
    assert_same(source.state_dict(), model.state_dict())
    _train_step(model, opt)
    with ckptmgr.CheckpointManager(directory) as manager:
        manager.save(10, model=model, optimizer=opt)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    again = _fresh()
    again_opt = torch.optim.SGD(again.parameters(), lr=0.5)
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        assert ckptmgr.resume_from_latest(directory, model=again, optimizer=again_opt, init_from=init_from) == 11
    assert_same(trained, again.state_dict())
    assert f"init_from {init_from} is only for a fresh run, not used" in caplog.text


def test_init_from_a_local_file(tmp_path, caplog):
    source = _source()
    path = str(tmp_path / "pretrained.pth")
    ckptmgr.save_checkpoint(source, path)
    _check_resumes_from_own_step(str(tmp_path / "run"), path, source, caplog)


def test_init_from_a_manager_directory_on_s3(s3, tmp_path, caplog):
    source = _source()
    with ckptmgr.CheckpointManager(f"{s3}/pretrain") as manager:
        manager.save(100, model=source)
        manager.save(200, model=source)  # the newest good step is the source
    _check_resumes_from_own_step(str(tmp_path / "run"), f"{s3}/pretrain", source, caplog)


def test_init_from_an_http_url(http_server, tmp_path, caplog):
    source = _source()
    buffer = io.BytesIO()
    torch.save({"state_dict": source.state_dict()}, buffer)
    url = http_server.add("/zoo/small.pth", buffer.getvalue())
    _check_resumes_from_own_step(str(tmp_path / "run"), url, source, caplog)
    assert http_server.gets("/zoo/small.pth") == 1  # downloaded once, into the cache


def test_init_from_revises_keys_and_logs_what_did_not_match(tmp_path, caplog):
    source = _source()
    state = {f"backbone.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc2.")}
    state["backbone.old_head.weight"] = torch.zeros(3, 3)
    path = str(tmp_path / "backbone.safetensors")
    from safetensors.torch import save_file
    save_file(state, path)
    model = _fresh()
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc2.")}
    with caplog.at_level(logging.INFO, logger="ckptmgr"):
        with ckptmgr.CheckpointManager(str(tmp_path / "run"), init_from=path,
                                       init_revise_keys=[(r"^backbone\.", "")]) as manager:
            assert manager.restore(model=model) is None
    now = model.state_dict()
    assert_same({k: v for k, v in source.state_dict().items() if not k.startswith("fc2.")},
                {k: v for k, v in now.items() if not k.startswith("fc2.")})
    assert_same(head, {k: v for k, v in now.items() if k.startswith("fc2.")})
    assert "missing keys in source state_dict: fc2.weight, fc2.bias" in caplog.text
    assert "unexpected key in source state_dict: old_head.weight" in caplog.text


def test_init_from_respects_exclude_patterns(tmp_path):
    source = _source()
    path = str(tmp_path / "pretrained.pth")
    ckptmgr.save_checkpoint(source, path)
    model = _fresh()
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc2.")}
    assert ckptmgr.resume_from_latest(str(tmp_path / "run"), model=model, init_from=path, exclude=("re:^fc2\\.",)) == 0
    assert_same(head, {k: v for k, v in model.state_dict().items() if k.startswith("fc2.")})
    assert torch.equal(model.fc1.weight, source.fc1.weight)


def test_init_from_a_missing_source_raises_and_an_explicit_step_ignores_it(tmp_path):
    model = _fresh()
    with pytest.raises(CheckpointNotFoundError):
        ckptmgr.resume_from_latest(str(tmp_path / "run"), model=model, init_from=str(tmp_path / "absent.pth"))
    with ckptmgr.CheckpointManager(str(tmp_path / "run"), init_from=str(tmp_path / "absent.pth")) as manager:
        with pytest.raises(CheckpointNotFoundError, match="step 3 has no committed checkpoint"):
            manager.restore(3, model=model)
    assert not os.path.exists(str(tmp_path / "run" / "step_00000003"))
    with pytest.raises(TypeError, match="init_from must be a path or URI"):
        ckptmgr.CheckpointManager(str(tmp_path / "run"), init_from=42)
