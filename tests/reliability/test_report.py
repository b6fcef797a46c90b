"""The reliability report's console shows progress lines and the table; server logs and fault lines go to its log."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_report_console_is_progress_and_table_only(tmp_path):
    log = tmp_path / "report.log"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "reliability_report.py"), "--only", "named-sync,s3",
         "--named-points", "save.before_manifest,save.after_manifest", "--named-repeats", "1", "--s3-rounds", "2",
         "--log", str(log)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    progress = proc.stderr.splitlines()
    assert progress == [f"log (S3 server requests, injected faults, warnings, child output): {log}",
                        progress[1], progress[2]], proc.stderr
    assert progress[1].startswith("kill -9 at named points (sync): 2/2 in ")
    assert progress[2].startswith("S3 behind a fault proxy (10% faults): 4/4 in ")
    table = proc.stdout.splitlines()
    assert table[0].startswith("| scenario |") and len(table) == 6 and table[-1].startswith("6 trials, 6 with"), \
        proc.stdout
    logged = log.read_text()
    assert logged.count("fault injected at save.") == 2        # one line per injected fault, in the log
    assert "werkzeug" in logged and '"PUT /' in logged           # the S3 server's request log, in the log
