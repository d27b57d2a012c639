"""Start N local worker processes on the same tuner command, the way N machines would share one study.

Each worker is `python -m tuner.cli <args>` in its own process group, with its output prefixed `[wN]`
line by line. Ctrl-C or SIGTERM to this process is passed on to every worker once, as SIGTERM (each hands
its running trial back and exits); a second one kills them. The exit code is the worst of the workers'.
Nothing here knows about Optuna: the workers share the study through its database, as remote ones do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import TextIO


def exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_workers(
    n: int,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    prefix: bool = True,
    python: str = sys.executable,
) -> int:
    """Run `n` workers of `tuner <args>` (e.g. ["grid", "lr-batch", "--storage", url]) until all exit.

    Their stdout and stderr go to `out` (default: this process's stderr), one whole line at a time, each
    prefixed `[w1] `..`[wN] ` unless `prefix` is False. Returns the worst exit code: 0 if all succeeded,
    else the highest (130 after Ctrl-C, 137 for a worker killed by SIGKILL, 3 for a database error...).
    """
    if n < 1:
        raise ValueError(f"the number of workers must be at least 1, got {n}")
    out = out or sys.stderr
    write_lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    for _ in range(n):
        procs.append(
            subprocess.Popen(
                [python, "-m", "tuner.cli", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                process_group=0,  # a terminal's Ctrl-C reaches us only; we pass it on once
                text=True,
                errors="replace",
                bufsize=1,
            )
        )

    def pump(i: int, stream: TextIO) -> None:
        tag = f"[w{i}] " if prefix else ""
        for line in stream:
            with write_lock:
                out.write(tag + line if line.endswith("\n") else tag + line + "\n")
                out.flush()

    readers = [threading.Thread(target=pump, args=(i + 1, p.stdout), daemon=True) for i, p in enumerate(procs)]
    for reader in readers:
        reader.start()

    signals_seen = 0

    def forward(signum, frame) -> None:
        nonlocal signals_seen
        signals_seen += 1
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signals_seen == 1 else signal.SIGKILL)

    restore = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, forward)
    try:
        codes = [exit_code(p.wait()) for p in procs]
    finally:
        for sig, previous in restore.items():
            signal.signal(sig, previous)
        for p in procs:  # only if waiting itself failed: leave no worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for reader in readers:
        reader.join(timeout=5)
    return max(codes)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tuner.workers N ARGS...`: the same as the CLI wiring will be, for use before it exists."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m tuner.workers N TUNER-ARGS... (e.g. 4 grid lr-batch --storage URL)", file=sys.stderr)
        return 2
    return run_workers(int(argv[0]), argv[1:], env=os.environ)


if __name__ == "__main__":
    sys.exit(main())
