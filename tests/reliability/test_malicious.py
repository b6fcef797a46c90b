"""Hostile files through every load path: typed errors, the canary never created (malicious.py)."""
import pytest

from reliability import malicious


@pytest.mark.timeout(240)
def test_no_load_path_runs_pickle_code_or_leaves_the_directory(http_server, s3, moto_server):
    malicious.run_malicious(http_server=http_server, s3_endpoint=moto_server).assert_all_ok()
