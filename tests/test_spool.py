"""The spool: records a sink missed are kept on disk, replayed once, and corrupt lines never crash it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.spool import Spool


def attempt(n: int) -> AttemptRecord:
    """A dropped, wasted attempt with every kind of field set."""
    return AttemptRecord(
        attempt_id=f"att-{n}",
        logical_request_id=f"req-{n}",
        attempt_number=2,
        started_at=datetime(2025, 3, 1, tzinfo=timezone.utc) + timedelta(seconds=n),
        outcome=Outcome.DROPPED,
        model="claude-sonnet-4-5",
        beta_features=("context-1m",),
        usage=Usage(input_tokens=100, output_tokens=10, output_estimated=True, estimated_output_tokens=10),
        server_tool_use={"web_search_requests": 1},
        cost=Cost(input_usd=0.0003, output_usd=0.00015),
        wasted=True,
        waste_reason=WasteReason.ABANDONED,
        tags={"workflow": "triage"},
        revision=1,
    )


class Collect:
    """A delivery callback that keeps what it was given (or fails, when told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.records: list[AttemptRecord] = []
        self.fail = fail

    def __call__(self, records: Sequence[AttemptRecord]) -> None:
        if self.fail:
            raise ConnectionError("still down")
        self.records.extend(records)


def _segments(spool: Spool, sink: str) -> list[Path]:
    return sorted(spool.sink_directory(sink).glob("*.jsonl"))


def test_spooled_records_replay_unchanged_and_the_segment_is_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [attempt(n) for n in range(25)]
    spool.append("sql", records[:10])
    spool.append("sql", records[10:])
    assert spool.pending("sql") == 25 and spool.pending() == 25

    delivered = Collect()
    assert spool.replay("sql", delivered, batch_size=10) == 25

    assert delivered.records == records
    assert spool.pending() == 0 and _segments(spool, "sql") == []
    assert spool.replay("sql", delivered) == 0


def test_failed_replay_keeps_the_segment_for_next_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append("sql", [attempt(n) for n in range(5)])
    with pytest.raises(ConnectionError):
        spool.replay("sql", Collect(fail=True))
    assert spool.pending("sql") == 5 and len(_segments(spool, "sql")) == 1

    delivered = Collect()
    assert spool.replay("sql", delivered) == 5
    assert [r.attempt_id for r in delivered.records] == [f"att-{n}" for n in range(5)]


def test_each_sink_has_its_own_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append("sql", [attempt(1)])
    spool.append("otel", [attempt(2)])
    delivered = Collect()
    spool.replay("sql", delivered)
    assert [r.attempt_id for r in delivered.records] == ["att-1"]
    assert spool.pending("otel") == 1


def test_corrupt_line_is_quarantined_with_a_log_message_and_the_rest_replays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    spool.append("sql", [attempt(1)])
    spool.close()
    [segment] = _segments(spool, "sql")
    with open(segment, "ab") as out:
        out.write(b'{"attempt_id": "half-writ\n')
        out.write(b'{"attempt_id": "no-other-fields"}\n')
    with open(segment, "ab") as out:
        out.write((attempt(2).to_dict().__repr__() + "\n").encode())  # not JSON at all

    caplog.set_level(logging.WARNING, logger="costwatch")
    delivered = Collect()
    assert Spool(tmp_path).replay("sql", delivered) == 1

    assert [r.attempt_id for r in delivered.records] == ["att-1"]
    quarantined = (segment.parent / "quarantine" / segment.name).read_bytes().splitlines()
    assert len(quarantined) == 3
    assert sum("unreadable spooled record" in r.getMessage() for r in caplog.records) == 3


def test_segment_a_live_writer_is_appending_to_is_left_alone(tmp_path: Path) -> None:
    writer, replayer = Spool(tmp_path), Spool(tmp_path)
    writer.append("sql", [attempt(1)])
    assert replayer.replay("sql", Collect()) == 0
    writer.close()
    delivered = Collect()
    assert replayer.replay("sql", delivered) == 1


def test_segment_of_a_process_that_died_is_replayed_by_another(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from datetime import datetime, timezone
        from costwatch.records import AttemptRecord, Outcome
        from costwatch.spool import Spool
        spool = Spool(sys.argv[1])
        started = datetime(2025, 3, 1, tzinfo=timezone.utc)
        orphan = AttemptRecord(attempt_id="orphan", logical_request_id="r", attempt_number=1,
                               started_at=started, outcome=Outcome.COMPLETED)
        spool.append("sql", [orphan])
        os._exit(0)  # no cleanup, like a crash
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True, timeout=300)
    delivered = Collect()
    assert Spool(tmp_path).replay("sql", delivered) == 1
    assert delivered.records[0].attempt_id == "orphan"


def test_directory_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTWATCH_SPOOL_DIR", str(tmp_path / "from-env"))
    assert Spool().directory == tmp_path / "from-env"
    monkeypatch.delenv("COSTWATCH_SPOOL_DIR")
    monkeypatch.chdir(tmp_path)
    assert Spool().directory == tmp_path / ".costwatch" / "spool"


def test_unwritable_spool_raises_oserror(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError):
        Spool(blocked).append("sql", [attempt(1)])


def test_spool_holds_no_prompt_text(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append("sql", [attempt(1)])
    [segment] = _segments(spool, "sql")
    assert set(segment.read_text().split('"')) >= {"att-1", "triage"}
    assert "messages" not in segment.read_text()
