"""Resident memory of a process that streams many attempts through costwatch: it must stay flat.

A fresh child process (so nothing else has grown its heap) runs ``costwatch.instrument()`` with its
default sinks and listeners (the SQL store in a temporary SQLite file, the Prometheus metrics, the
span listener) and streams small answers from the fake API, one after another, sampling its resident
set size as it goes. Growth is measured after a warm-up: the retry tracker legitimately fills up to
its bound (10,000 logical requests) first, and the allocator settles.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fake_api_process import deltas_for_events, fake_api_in_subprocess
from measure import Measurement, resident_bytes

__all__ = ["GROWTH_TARGET_MB", "measure_memory_growth"]

GROWTH_TARGET_MB = 10.0
"""Resident memory may grow at most this much after the warm-up, over the rest of the run."""
_SAMPLES = 20
_EVENTS = 40
_CHILD_TIMEOUT_S = 3_600


def _stream_attempts(base_url: str, attempts: int, database: str) -> dict[str, Any]:
    import anthropic

    import costwatch
    from costwatch.pipeline import get_pipeline

    costwatch.instrument(database_url=database)
    client = anthropic.Anthropic(base_url=base_url, api_key="bench", max_retries=0)
    every = max(1, attempts // _SAMPLES)
    samples: list[tuple[int, int]] = [(0, resident_bytes())]
    for i in range(1, attempts + 1):
        for _ in client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=deltas_for_events(_EVENTS),
            messages=[{"role": "user", "content": f"ticket {i}: classify this support request"}],
            metadata={"user_id": f"user-{i % 500}"},
            stream=True,
        ):
            pass
        if i % every == 0:
            samples.append((i, resident_bytes()))
    get_pipeline().flush(60)
    samples.append((attempts, resident_bytes()))
    return {"samples": samples}


def measure_memory_growth(attempts: int, *, warm_up: int) -> list[Measurement]:
    """Stream ``attempts`` small answers in a child process; growth of its RSS after ``warm_up`` attempts."""
    with fake_api_in_subprocess() as url, tempfile.TemporaryDirectory(prefix="costwatch-bench-") as directory:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                url,
                str(attempts),
                f"sqlite:///{Path(directory) / 'mem.db'}",
            ],
            capture_output=True,
            text=True,
            timeout=_CHILD_TIMEOUT_S,
            check=True,
            cwd=directory,  # the pipeline's spool, if any, lands in the throwaway directory
        )
    samples = [(int(n), int(rss)) for n, rss in json.loads(result.stdout.splitlines()[-1])["samples"]]
    after_warm_up = [rss for n, rss in samples if n >= warm_up] or [samples[-1][1]]
    growth_mb = (samples[-1][1] - after_warm_up[0]) / 1e6
    return [
        Measurement(
            benchmark="memory",
            case=f"{attempts:,} streamed attempts ({_EVENTS} events each), default sinks",
            metric=f"RSS growth after {warm_up:,}-attempt warm-up",
            value=growth_mb,
            unit="MB",
            target=f"< {GROWTH_TARGET_MB:g} MB",
            met=growth_mb < GROWTH_TARGET_MB,
            detail={
                "rss_start_mb": samples[0][1] / 1e6,
                "rss_after_warm_up_mb": after_warm_up[0] / 1e6,
                "rss_end_mb": samples[-1][1] / 1e6,
                "samples": [[n, round(rss / 1e6, 2)] for n, rss in samples],
            },
        )
    ]


def _child_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", metavar="BASE_URL", required=True)
    parser.add_argument("attempts", type=int)
    parser.add_argument("database")
    args = parser.parse_args()
    print(json.dumps(_stream_attempts(args.child, args.attempts, args.database)), flush=True)


if __name__ == "__main__":
    _child_main()
