"""The local default's supervisor: restarts the raybatch server when it dies.

``raybatch up`` starts it detached (``python -m raybatch.local.supervisor --home H``)
and records its pid in ``<home>/local.json`` as one of the local default's parts. Once
a second it looks whether the recorded server process still runs (one ``kill(pid, 0)``
and one small file read: negligible CPU). When it has died, it starts a new one on the
same port, with back-off when it keeps dying, counts the restart in local.json (where
``raybatch status`` shows it) and logs why to ``<home>/logs/supervisor.log``. The new
server re-adopts the running attempts (the scheduler's reconcile), so jobs go on with
the same attempt.

It never fights ``up`` or ``down``: it starts a server only while holding
``<home>/.lock`` and after reading local.json again under it, and it exits as soon as
local.json is gone (``down``) or names another supervisor (an ``up`` replaced it).
``down`` stops it before the server, under the same lock, so a server that ``down``
stopped is never started again.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from raybatch.local.embedded import SERVER, LocalCluster

POLL_S = 1.0
BACKOFF_S = (0, 1, 2, 5, 10, 30, 60)  # before the 1st, 2nd, ... restart in a row
STABLE_S = 60.0  # a server that stayed up this long was not crash-looping: the back-off starts over


def _log(message: str) -> None:
    print(time.strftime("%Y-%m-%d %H:%M:%S ") + message, flush=True)


def _exit_words(child: Optional[subprocess.Popen], pid: int) -> str:
    """How the server process ended, when it was our child; a server ``up`` started is not."""
    if child is None or child.pid != pid or child.poll() is None:
        return "its process had exited"
    code = child.returncode
    if code < 0:
        try:
            return f"it was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"it was killed by signal {-code}"
    return f"it exited with code {code}"


class Supervisor:
    def __init__(self, home: Path):
        self.local = LocalCluster(home)
        self.child: Optional[subprocess.Popen] = None  # the last server we started (to reap it)
        self.in_a_row = 0          # restarts without a stable run in between
        self.started_at = 0.0      # monotonic time of our last restart
        self.dead_since: Optional[float] = None

    def mine(self, info: Optional[dict]) -> bool:
        return bool(info) and info.get("pids", {}).get("supervisor") == os.getpid()

    def run(self) -> None:
        with self.local.locked():
            pass  # the `up` that started us records our pid under the lock: let it finish
        _log(f"supervising the raybatch server of {self.local.home} (pid {os.getpid()})")
        while True:
            if self.child is not None:
                self.child.poll()  # reap a server we started, so it does not linger as a zombie
            info = self.local.info()
            if not self.mine(info):
                _log("local.json is gone or names another supervisor (`raybatch down` or `up`): exiting")
                return
            pid = info["pids"].get(SERVER)
            if self.local.pid_alive(info, pid):
                self.dead_since = None
                if self.in_a_row and time.monotonic() - self.started_at > STABLE_S:
                    self.in_a_row = 0
            else:
                now = time.monotonic()
                self.dead_since = self.dead_since or now
                if now - self.dead_since >= BACKOFF_S[min(self.in_a_row, len(BACKOFF_S) - 1)]:
                    if not self.restart(pid):
                        return
            time.sleep(POLL_S)

    def restart(self, dead_pid: Optional[int]) -> bool:
        """Start a server in place of ``dead_pid``, under the lock and only if local.json
        still says so; False when this supervisor should exit."""
        local = self.local
        with local.locked():
            info = local.info()
            if not self.mine(info):
                return False
            if info["pids"].get(SERVER) != dead_pid or local.pid_alive(info, dead_pid):
                return True  # someone (`raybatch up`) started one meanwhile
            if not local.pid_alive(info, info["pids"].get("head")):
                # the jobs went with the head's GCS: a server alone would serve a dead cluster
                _log("the Ray head is gone too: nothing to supervise; `raybatch up` starts afresh: exiting")
                return False
            why = _exit_words(self.child, dead_pid)
            self.child = local.start_server(info, dict(os.environ))
            local.count_restart(info, SERVER, f"restarted by the supervisor: {why}")
            local._write(info)
        self.in_a_row += 1
        self.started_at = time.monotonic()
        self.dead_since = None
        _log(f"the server (pid {dead_pid}) is gone: {why}; started pid {self.child.pid} "
             f"(restart {info['restarts'][SERVER]})")
        return True


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m raybatch.local.supervisor",
                                description="Restart the local default's raybatch server when it dies.")
    p.add_argument("--home", required=True, type=Path, help="the local default's RAYBATCH_HOME")
    args = p.parse_args(argv)
    # `down` ends us with SIGTERM: exit at once, even while waiting for the lock
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Supervisor(args.home).run()


if __name__ == "__main__":
    main()
