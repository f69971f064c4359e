"""Identical request bodies sent at once for different jobs, with random drops: every job is one logical
request of its own, however the threads or tasks interleave."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import anthropic
import pytest
from conftest import async_client, sync_client

import costwatch
from costwatch import Outcome, WasteReason
from costwatch.testing import DropProfile, FakeAnthropicServer, ResponseSpec
from costwatch.testing.ledger import Ending

JOBS = 32
MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Summarise the quarterly report."}]  # the same for every job
SPEC = ResponseSpec.small(60, event_interval_s=0.0005)
DROPS = DropProfile(drop_rate=0.4, seed=20)
MAX_ATTEMPTS = 25
_FAILURES = (anthropic.APIConnectionError, anthropic.APIStatusError, Exception)


def assert_one_logical_request_per_job(records, attempts_by_job):
    by_job = collections.defaultdict(list)
    for record in records:
        by_job[record.tags["job"]].append(record)
    assert sorted(by_job) == sorted(f"job-{j}" for j in range(JOBS))
    request_jobs = collections.defaultdict(set)
    for job, attempts in by_job.items():
        ids = {r.logical_request_id for r in attempts}
        assert len(ids) == 1, f"{job} was split across {len(ids)} logical requests"
        request_jobs[ids.pop()].add(job)
        assert len(attempts) == attempts_by_job[job]
        ordered = sorted(attempts, key=lambda r: r.attempt_number)
        assert [r.attempt_number for r in ordered] == list(range(1, len(attempts) + 1))
        assert ordered[-1].outcome is Outcome.COMPLETED and not ordered[-1].wasted
        assert all(r.waste_reason is WasteReason.RETRIED for r in ordered[:-1])
    assert len(request_jobs) == JOBS
    assert all(len(jobs) == 1 for jobs in request_jobs.values()), "a logical request mixes jobs"


@pytest.mark.parametrize("backoff", [False, True], ids=["no-backoff", "backoff"])
def test_threads_sending_one_body_for_different_jobs_keep_each_job_one_logical_request(accounting, backoff):
    attempts_by_job: dict[str, int] = {}
    with FakeAnthropicServer(SPEC, drop_profile=DROPS) as server:
        start = threading.Barrier(JOBS)

        def job(j: int) -> None:
            client = sync_client(server, max_retries=0)
            rng = random.Random(j)
            start.wait()
            with costwatch.tags(job=f"job-{j}"):
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    try:
                        stream = client.messages.create(
                            model=MODEL, max_tokens=1024, messages=MESSAGES, stream=True
                        )
                        list(stream)
                    except _FAILURES:
                        if backoff:
                            time.sleep(rng.uniform(0.001, 0.02))
                        continue
                    attempts_by_job[f"job-{j}"] = attempt
                    return

        threads = [threading.Thread(target=job, args=(j,)) for j in range(JOBS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        dropped = sum(1 for e in server.ledger.entries if e.ending is Ending.CUT)
    assert len(attempts_by_job) == JOBS and dropped > JOBS // 4  # every job finished, many after drops
    assert_one_logical_request_per_job(accounting.records(), attempts_by_job)


@pytest.mark.parametrize("backoff", [False, True], ids=["no-backoff", "backoff"])
def test_asyncio_tasks_sending_one_body_for_different_jobs_keep_each_job_one_logical_request(
    accounting, backoff
):
    attempts_by_job: dict[str, int] = {}
    with FakeAnthropicServer(SPEC, drop_profile=DROPS) as server:

        async def job(client, j: int) -> None:
            rng = random.Random(j)
            with costwatch.tags(job=f"job-{j}"):
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    try:
                        stream = await client.messages.create(
                            model=MODEL, max_tokens=1024, messages=MESSAGES, stream=True
                        )
                        async for _ in stream:
                            pass
                    except _FAILURES:
                        if backoff:
                            await asyncio.sleep(rng.uniform(0.001, 0.02))
                        continue
                    attempts_by_job[f"job-{j}"] = attempt
                    return

        async def main() -> None:
            client = async_client(server, max_retries=0)
            # The parent's own attempt first: every task inherits its context, and must not count it
            # as its own.
            await client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES)
            await asyncio.gather(*(job(client, j) for j in range(JOBS)))

        asyncio.run(main())
        dropped = sum(1 for e in server.ledger.entries if e.ending is Ending.CUT)
    assert len(attempts_by_job) == JOBS and dropped > JOBS // 4
    records = [r for r in accounting.records() if "job" in r.tags]
    assert_one_logical_request_per_job(records, attempts_by_job)
