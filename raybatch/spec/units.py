"""Parsing of the human units a job file uses: durations, times and memory sizes."""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import Decimal

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIMPLE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
# Batch AI's maxWallClockTime: [d.]hh:mm:ss
_CLOCK = re.compile(r"^\s*(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})\s*$")

DURATION_HELP = "seconds as a number, '90s', '30m', '2h', '7d', or Batch AI's 'd.hh:mm:ss'"

def _float(value: object, what: str, help_: str) -> float:
    """``float(value)``; a number too large for a float (a 400-digit integer) is a
    ValueError that says so, not an OverflowError."""
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{what} is far too large ({help_})") from None


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``'30m'``, ``'2h'``, ``'1d'``, ``'01:30:00'`` or ``'7.00:00:00'``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration ({DURATION_HELP})")
    if isinstance(value, (int, float)):
        seconds = _float(value, "the duration", DURATION_HELP)
    else:
        text = str(value)
        m = _SIMPLE.match(text)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
        else:
            m = _CLOCK.match(text)
            if not m:
                raise ValueError(f"'{text}' is not a duration ({DURATION_HELP})")
            days, hours, minutes, secs = (int(g) if g else 0 for g in m.groups())
            if minutes >= 60 or secs >= 60:
                raise ValueError(f"'{text}': minutes and seconds must be below 60")
            seconds = float(days * 86400 + hours * 3600 + minutes * 60 + secs)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive ({DURATION_HELP})")
    if math.isinf(seconds):  # '.inf', or a number of 309 digits or more
        raise ValueError(f"a duration must be finite ({DURATION_HELP})")
    return seconds


# Upper bounds of the durations a job's time arithmetic uses (now + max_wall_clock for the
# queue's estimates, the web view's and CLI's times): anything past them is a typo or an
# attack, and 1e300 s would overflow every datetime on the way.
MAX_WALL_CLOCK_LIMIT = 10 * 365 * 86400.0  # 10 years
MAX_GRACE_PERIOD = 86400.0  # 1 day


def parse_bounded_duration(value: object, limit: float, limit_words: str) -> float:
    """``parse_duration``, at most ``limit`` seconds (``limit_words``: '10 years'); ValueError
    naming the limit otherwise (the spec's error names the field and the value given)."""
    seconds = parse_duration(value)
    if seconds > limit:
        raise ValueError(f"must be at most {limit_words} ({limit:.0f} s)")
    return seconds


def duration_text(seconds: float) -> str:
    """A duration in seconds as text ``parse_duration`` reads back exactly: ``'1234567s'``,
    ``'1.5s'`` (never an exponent: ``f"{1234567.0:g}"`` is ``'1.23457e+06'``)."""
    text = format(Decimal(repr(float(seconds))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}s"


TIME_HELP = "an ISO 8601 time with its time zone ('2030-05-01T18:00:00Z', '2030-05-01T20:00+02:00')"


def parse_duration_or_time(value: object, field: str) -> "float | dt.datetime":
    """A duration (seconds, as ``parse_duration``) or an ISO 8601 time with its time zone (an
    aware datetime; a ``datetime`` is taken as it is). A time without a time zone is an
    error that names ``field``: raybatch never guesses a zone (the server's local time is
    not the user's). ValueError, naming ``field``, for anything else."""
    if isinstance(value, dt.datetime):
        when = value
        text = value.isoformat()
    else:
        if isinstance(value, dt.date):
            value = value.isoformat()
        try:
            return parse_duration(value)
        except ValueError:
            pass
        text = str(value).strip()
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{field}: '{text}' is neither a time nor a duration ({TIME_HELP}; or a duration: "
                             f"{DURATION_HELP})") from None
    if when.tzinfo is None:
        raise ValueError(f"{field}: '{text}' has no time zone: add one (Z, +02:00), or give a duration such "
                         "as '6h'")
    return when


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}
SIZE_HELP = "bytes as a number, or with a unit such as '512MiB', '4GiB', '2GB'"
# More memory than any node has, and within what Ray's resource quantities hold (fixed
# point, 1/10000 units in an int64: about 9.2e14).
MAX_SIZE_BYTES = 1 << 49  # 512 TiB


def parse_size(value: object) -> int:
    """Bytes from ``1073741824``, ``'1GiB'``, ``'512Mi'``, ``'2GB'``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size ({SIZE_HELP})")
    if isinstance(value, (int, float)):
        size = _float(value, "the size", SIZE_HELP)
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"'{value}' is not a size ({SIZE_HELP})")
        size = float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "").lower()]
    if math.isnan(size) or size <= 0:
        raise ValueError(f"a size must be positive ({SIZE_HELP})")
    if size > MAX_SIZE_BYTES:  # infinity included
        raise ValueError(f"a size can be at most 512 TiB ({MAX_SIZE_BYTES} bytes; {SIZE_HELP})")
    return int(size)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
