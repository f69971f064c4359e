"""Reading the moments a report starts and ends at: ``24h`` / ``7d`` / ``90m`` ago, or ISO dates."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

__all__ = ["MomentError", "ceil_hour", "floor_hour", "parse_duration", "parse_moment"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATIONS = "use a number and a unit (s, m, h, d or w) like 30s, 90m, 24h, 7d or 2w"
_EXAMPLES = "use a duration like 90m, 24h, 7d or 2w (meaning that long ago), or a date like 2026-11-25"


class MomentError(ValueError):
    """Text that is neither a duration nor an ISO date or datetime; the message says what is accepted."""


def parse_duration(text: str) -> timedelta:
    """A duration written as a number and a unit: ``30s``, ``90m``, ``24h``, ``7d``, ``2w``."""
    match = _DURATION.match(text)
    if match is None:
        raise MomentError(f"{text!r} is not a duration; {_DURATIONS}")
    amount, unit = float(match.group(1)), _UNITS[match.group(2).lower()]
    try:
        return timedelta(**{unit: amount})
    except OverflowError:
        raise MomentError(f"{text!r} is longer than any calendar can count; {_DURATIONS}") from None


def parse_moment(text: str, now: datetime) -> datetime:
    """The UTC moment ``text`` names: a duration before ``now``, or an ISO 8601 date or datetime.

    A date means its midnight in UTC; a datetime without an offset is taken as UTC.
    """
    if _DURATION.match(text):
        try:
            return now.astimezone(timezone.utc) - parse_duration(text)
        except OverflowError:
            raise MomentError(f"{text!r} ago is before the year 1; {_EXAMPLES}") from None
        except MomentError:  # beyond what a timedelta holds: a moment may be a date as well
            raise MomentError(f"{text!r} is longer than any calendar can count; {_EXAMPLES}") from None
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise MomentError(f"{text!r} is neither a duration nor an ISO date; {_EXAMPLES}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def floor_hour(moment: datetime) -> datetime:
    """The start of the UTC hour ``moment`` falls in."""
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def ceil_hour(moment: datetime) -> datetime:
    """The first UTC hour boundary at or after ``moment``."""
    floored = floor_hour(moment)
    return floored if floored == moment.astimezone(timezone.utc) else floored + timedelta(hours=1)
