"""A zygote process that forks checkpoint savers fast, so crash tests can kill dozens of them."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["Zygote"]


class Zygote:
    """Drives tests/support/crash_child.py: fork a saver, kill it, wait until it is reaped."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.crash_child"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def fork_saver(self, **job):
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def kill(self, pid):
        os.kill(pid, signal.SIGKILL)
        self.proc.stdin.write(f"wait {pid}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == f"reaped {pid}"

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
