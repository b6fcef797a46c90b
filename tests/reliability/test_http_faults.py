"""Downloads from a misbehaving server recover from transient faults and fail clearly otherwise (http_faults.py)."""
import pytest

from reliability import http_faults


@pytest.mark.timeout(240)
def test_http_faults(http_server, monkeypatch):
    for name in ("CKPTMGR_DOWNLOAD_TIMEOUT", "CKPTMGR_DOWNLOAD_RETRIES"):
        monkeypatch.setenv(name, "1")  # restored after the test; run_http_faults sets its own values
    http_faults.run_http_faults(http_server).assert_all_ok()
