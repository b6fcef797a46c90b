"""``ckptmgr verify --key-file``: signatures are checked with the key; unsigned or foreign-key steps are damage."""
import json
import os

from ckptmgr import CheckpointManager
from tests.cli.conftest import small_model


def _signed_run(tmp_path, key_file):
    directory = str(tmp_path / "signed")
    with CheckpointManager(directory, signing_key=str(key_file)) as mgr:
        mgr.save(1, model=small_model())
        mgr.save(2, model=small_model())
    return directory


def test_verify_checks_signatures_with_a_key_file(tmp_path, ckptmgr_cli, monkeypatch):
    monkeypatch.delenv("CKPTMGR_SIGNING_KEY", raising=False)
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    key_a.write_text("a" * 64 + "\n")
    key_b.write_text("b" * 64 + "\n")
    directory = _signed_run(tmp_path, key_a)
    ok = ckptmgr_cli("verify", directory, "--key-file", key_a)
    assert ok.code == 0 and ok.out.count("signed with key id") == 2 and "all 2 intact" in ok.out, ok
    wrong = ckptmgr_cli("verify", directory, "--key-file", key_b)
    assert wrong.code == 1 and wrong.out.count("signed with another key") == 2, wrong
    assert ckptmgr_cli("verify", directory).code == 0          # without a key: checksums only, as before
    with CheckpointManager(directory, signing_key=False) as mgr:  # a step from a job without the key
        mgr.save(3, model=small_model())
    mixed = ckptmgr_cli("verify", directory, "--key-file", key_a, "--json")
    report = json.loads(mixed.out)
    assert mixed.code == 1 and [bool(r["signed_by"]) for r in report["checked"]] == [True, True, False]
    assert "is not signed" in report["checked"][2]["problems"][0]
    monkeypatch.setenv("CKPTMGR_SIGNING_KEY", str(key_a))       # the environment's key is the default
    assert ckptmgr_cli("verify", os.path.join(directory, "step_00000002")).code == 0
    short = tmp_path / "short.key"
    short.write_text("abc")
    assert ckptmgr_cli("verify", directory, "--key-file", short).code == 2
