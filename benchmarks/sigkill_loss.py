"""7. What ``SIGKILL`` loses: the attempt records still queued in memory when the process dies.

No handler runs on ``SIGKILL``, so records the writer thread has not yet written or spooled are lost.
A child process, instrumented with the defaults (a SQLite store, ``COSTWATCH_FLUSH_INTERVAL`` 1 s),
streams small answers back to back from the fake API and prints each attempt it finished; after a
while it is killed. Lost = attempts it finished minus those in the store or its spool afterwards.
The statement to check: at most one flush interval's worth of attempts (plus one batch being written).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fake_api_process import fake_api_in_subprocess
from measure import Measurement

from costwatch.spool import Spool
from costwatch.store import SqlStore

__all__ = ["measure_sigkill_loss"]

_CHILD = textwrap.dedent(
    """
    import sys
    import anthropic
    import costwatch

    costwatch.instrument(database_url=sys.argv[1], spool_dir=sys.argv[2], metrics=False, listeners=[])
    client = anthropic.Anthropic(base_url=sys.argv[3], api_key="sk-ant-bench", max_retries=0)
    n = 0
    while True:
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": f"n {n}"}]
        ) as stream:
            for _ in stream.text_stream:
                pass
        n += 1
        print(n, flush=True)
    """
)


def _one_kill(base_url: str, run_s: float) -> tuple[int, int, float]:
    """(attempts finished, attempts lost, attempts per second) of one child killed after ``run_s``."""
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'kill.db'}"
        SqlStore(url).attempt_count()  # migrated before the clock starts
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, str(Path(scratch) / "spool"), base_url],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        first = child.stdout.readline()  # the first attempt is done: the clock starts
        started = time.monotonic()
        time.sleep(run_s)
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
        child.wait()
        elapsed = time.monotonic() - started
        finished = int((first + rest).split()[-1])
        store = SqlStore(url)
        stored = store.attempt_count()
        store.shutdown()
        spool = Spool(Path(scratch) / "spool")
        spooled = sum(
            len(path.read_bytes().splitlines()) for path in spool.sink_directory(store.name).glob("*.jsonl")
        )
        return finished, finished - stored - spooled, finished / elapsed


def measure_sigkill_loss(kills: int, *, run_s: float) -> list[Measurement]:
    """Kill ``kills`` children after ``run_s`` seconds each; the largest loss, in records and seconds."""
    results = []
    with fake_api_in_subprocess() as base_url:
        for _ in range(kills):
            results.append(_one_kill(base_url, run_s))
    worst = max(results, key=lambda r: r[1])
    lost_seconds = max(lost / rate for _, lost, rate in results)
    return [
        Measurement(
            benchmark="sigkill",
            case=f"{kills} children killed after {run_s:g} s of back-to-back streams, defaults",
            metric="records lost (worst), as seconds of traffic",
            value=lost_seconds,
            unit="s",
            target="<= 1 flush interval (1 s) + one batch",
            met=lost_seconds <= 1.0 + 500 / max(worst[2], 1e-9),
            detail={"runs": [{"finished": f, "lost": n, "attempts_per_s": rate} for f, n, rate in results]},
        )
    ]
