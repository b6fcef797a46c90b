"""A zygote process that forks checkpoint savers fast, so crash tests can kill dozens of them.

Starting Python and importing torch takes seconds, so a zygote module
(``tests/support/crash_child.py``, ``reliability/tiered_child.py``) imports
everything once and serves fork requests with :func:`serve`; :class:`Zygote`
drives it from the test:

    stdin  <- a JSON job    stdout -> the forked saver's PID
    stdin  <- "wait PID"    stdout -> "reaped PID"
"""
import json
import os
import signal
import subprocess
import sys
from typing import Any, Callable, Dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

__all__ = ["Zygote", "serve", "is_dead"]


class Zygote:
    """Drives a zygote module (default tests/support/crash_child.py): fork a saver, kill it, reap it.

    Args:
        module: The zygote's module, run with ``python -m`` from the repository root.
        close_timeout: Seconds :meth:`close` waits for the zygote to exit.
    """

    def __init__(self, module: str = "tests.support.crash_child", close_timeout: float = 10):
        self.close_timeout = close_timeout
        self.proc = subprocess.Popen([sys.executable, "-m", module], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _send(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def fork_saver(self, **job: Any) -> int:
        return int(self._send(json.dumps(job)))

    def reap(self, pid: int) -> None:
        """Wait until the (dead or killed) saver is gone: its directory will not change any more."""
        assert self._send(f"wait {pid}") == f"reaped {pid}"

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.reap(pid)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=self.close_timeout)


def serve(run: Callable[[Dict[str, Any]], None]) -> None:
    """The zygote's loop: fork a child per JSON job on stdin that calls ``run(job)``; reap on "wait PID".

    The child sets ``job["env"]`` (e.g. ``CKPTMGR_FAULT_POINT``: die at a named instant) first, and appends
    ``error <type>: <message>`` (one line) to ``job["log"]`` if ``run`` raises; it never returns to the loop.
    """
    for line in sys.stdin:
        if line.startswith("wait "):
            pid = int(line.split()[1])
            os.waitpid(pid, 0)
            print(f"reaped {pid}", flush=True)
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.environ.update(job.get("env", {}))
            try:
                run(job)
            except BaseException as exc:  # report, never fall back into the zygote's loop
                with open(job["log"], "a") as fh:
                    fh.write(f"error {type(exc).__name__}: {exc}\n".replace("\n", " ").rstrip() + "\n")
            finally:
                os._exit(1)
        print(pid, flush=True)


def is_dead(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie not yet reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
