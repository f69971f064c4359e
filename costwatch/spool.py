"""The spool: an append-only local file store for attempt records a sink has not received yet.

When a sink cannot take a batch (the database is down or slow) or the pipeline's queue is full, the
records are appended here as JSON lines and replayed to that sink once it recovers. Layout::

    $COSTWATCH_SPOOL_DIR/<sink name>/<pid>-<random>.jsonl       segments, one being written per process
    $COSTWATCH_SPOOL_DIR/<sink name>/quarantine/<segment>      lines that could not be read back

A process holds an exclusive ``flock`` on the segment it is appending to, so a replaying process
(this one or any other, including after a crash) only takes segments nobody is writing. A
segment is deleted once every record in it was delivered; delivery is idempotent on ``attempt_id``,
so a segment replayed twice (a crash between delivery and deletion) does no harm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from .records import AttemptRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; segments are then not shared safely
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_SPOOL_DIR", "SPOOL_DIR_ENV", "Spool"]

log = logging.getLogger("costwatch")

SPOOL_DIR_ENV = "COSTWATCH_SPOOL_DIR"
"""The environment variable naming the spool directory."""

DEFAULT_SPOOL_DIR = ".costwatch/spool"
"""The spool directory when ``$COSTWATCH_SPOOL_DIR`` is unset, relative to the working directory."""

_SEGMENT_SUFFIX = ".jsonl"
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _lock(fd: int, *, wait: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


class _Segment:
    """The file this process is appending to for one sink (held under an exclusive lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _lock(self.fd, wait=True)
        self.records = 0

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def close(self) -> None:
        os.close(self.fd)


class Spool:
    """Per-sink append-only record files, replayed to the sink once it recovers.

    ``directory`` defaults to ``$COSTWATCH_SPOOL_DIR``, else ``.costwatch/spool`` in the working
    directory at construction time. Nothing touches the disk until the first :meth:`append`.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        chosen = directory if directory is not None else (os.environ.get(SPOOL_DIR_ENV) or DEFAULT_SPOOL_DIR)
        self.directory = Path(chosen).absolute()
        # Reentrant: a SIGTERM handler may spill the queue into the spool while the interrupted main
        # thread is itself inside append().
        self._lock = threading.RLock()
        self._active: dict[str, _Segment] = {}
        self._pending: dict[Path, int] = {}

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r})"

    def sink_directory(self, sink_name: str) -> Path:
        """Where the segments of one sink live."""
        return self.directory / (_UNSAFE_NAME.sub("_", sink_name) or "_")

    # -- writing -----------------------------------------------------------------------------
    def append(self, sink_name: str, records: Sequence[AttemptRecord]) -> None:
        """Append records for ``sink_name``; raises ``OSError`` if they could not be written."""
        if not records:
            return
        data = "".join(json.dumps(record.to_dict(), separators=(",", ":")) + "\n" for record in records)
        with self._lock:
            segment = self._active.get(sink_name)
            if segment is None:
                folder = self.sink_directory(sink_name)
                folder.mkdir(parents=True, exist_ok=True)
                segment = _Segment(folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}{_SEGMENT_SUFFIX}")
                self._active[sink_name] = segment
            segment.append(data.encode())
            segment.records += len(records)
            self._pending[segment.path] = self._pending.get(segment.path, 0) + len(records)

    def pending(self, sink_name: str | None = None) -> int:
        """Records spooled and not yet replayed, as far as this process knows.

        Counts what this process appended plus what it found in other processes' segments during
        replay; segments of other live processes it has not looked into yet are not counted.
        """
        with self._lock:
            if sink_name is None:
                return sum(self._pending.values())
            folder = self.sink_directory(sink_name)
            return sum(count for path, count in self._pending.items() if path.parent == folder)

    def has_segments(self, sink_name: str) -> bool:
        """Whether any segment (of any process) exists for ``sink_name``."""
        folder = self.sink_directory(sink_name)
        try:
            return any(entry.name.endswith(_SEGMENT_SUFFIX) for entry in os.scandir(folder))
        except OSError:  # missing, or not a directory at all: nothing can be spooled there
            return False

    # -- replaying ---------------------------------------------------------------------------
    def replay(
        self,
        sink_name: str,
        deliver: Callable[[Sequence[AttemptRecord]], None],
        *,
        batch_size: int = 500,
    ) -> int:
        """Deliver every segment for ``sink_name`` nobody is writing, deleting each once delivered.

        Returns the number of records delivered. If ``deliver`` raises, the segment being replayed
        is kept whole for the next attempt and the exception propagates.
        """
        with self._lock:
            # Seal this process's own segment so it can be replayed; appends start a new one.
            own = self._active.pop(sink_name, None)
            if own is not None:
                own.close()
        folder = self.sink_directory(sink_name)
        try:
            paths = sorted(
                (entry.path for entry in os.scandir(folder) if entry.name.endswith(_SEGMENT_SUFFIX)),
                key=lambda p: (os.path.getmtime(p) if os.path.exists(p) else 0.0, p),
            )
        except FileNotFoundError:
            return 0
        delivered = 0
        for path in paths:
            delivered += self._replay_segment(Path(path), deliver, batch_size)
        return delivered

    def _replay_segment(
        self, path: Path, deliver: Callable[[Sequence[AttemptRecord]], None], batch_size: int
    ) -> int:
        with self._lock:
            if any(segment.path == path for segment in self._active.values()):
                return 0
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return 0  # another process replayed it first
        try:
            if not _lock(fd, wait=False):
                return 0  # a live process is still appending to it
            # Another replayer may have finished and unlinked it between our open and our lock.
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return 0
            except FileNotFoundError:
                return 0
            with os.fdopen(os.dup(fd), "rb") as stream:
                records = self._read_segment(path, stream.read())
            with self._lock:
                self._pending[path] = len(records)
            for start in range(0, len(records), batch_size):
                deliver(records[start : start + batch_size])
            path.unlink()
            with self._lock:
                self._pending.pop(path, None)
            return len(records)
        finally:
            os.close(fd)

    def _read_segment(self, path: Path, data: bytes) -> list[AttemptRecord]:
        records: list[AttemptRecord] = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(AttemptRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                self._quarantine(path, number, line, exc)
        return records

    def _quarantine(self, path: Path, number: int, line: bytes, error: Exception) -> None:
        # The line is kept for a human to inspect; the log says where, not what.
        folder = path.parent / "quarantine"
        try:
            folder.mkdir(exist_ok=True)
            with open(folder / path.name, "ab") as out:
                out.write(line + b"\n")
            where = f"moved to {folder / path.name}"
        except OSError as exc:
            where = f"and could not be quarantined ({exc})"
        log.warning(
            "costwatch: unreadable spooled record at %s line %d (%s); %s",
            path.name,
            number,
            type(error).__name__,
            where,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close this process's segments (they stay on disk for replay)."""
        with self._lock:
            for segment in self._active.values():
                segment.close()
            self._active.clear()

    def after_fork_in_child(self) -> None:
        """Forget the parent's segments: the child appends to its own and must not hold the parent's."""
        self._lock = threading.RLock()
        for segment in self._active.values():
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        self._active = {}
        self._pending = {}
