"""Splits held out in time: each location's later crops, or a calendar period, to val and test.

A location-held-out split asks "does the model work at a camera it has never seen"; a
time-held-out split asks "does it still work next season at the cameras it was trained on".
Here every crop gets a split from its time, location by location:

- ``test_last``/``val_last`` (``"3M"``, ``"90D"``, ``"2W"``, ``"1Y"``): test is the last 3 months
  of every location's record; val the given span just before test's first crop there.
- ``test_period``/``val_period`` (``"2011"``, ``"2011-06..2011-08"``, ``"2011-06-01..2011-06-30"``):
  a calendar period, both ends inclusive at their own precision, for every location.
- neither: the last ``test_frac`` of each location's crops in time to test, the ``val_frac``
  before it to val (a moment goes to the split its middle crop falls in).

The unit that is never cut is a *moment*: the crops of one location that share a start time,
where a sequence's crops all take its first frame's time. So the frames of one burst, and two
cameras firing at the same second, never straddle two splits.

Crops without a datetime take their sequence's time when another frame of it has one; the
rest follow ``missing`` (``"drop"``: left out of the dataset, ``"train"``: kept in train),
and are counted in the report either way.

Datetimes are read by one rule for the whole file, never guessed value by value: ISO 8601
(``2011-06-13 10:00:00``, ``...T10:00:00+02:00``) or EXIF (``2011:06:13 10:00:00``) by default,
else the one strptime format given (``datetime_format``, ``--datetime-format %d/%m/%Y %H:%M``).
A value that fits neither is an error naming the file and the value: ``01/05/2012`` read as
January 5th at one camera and May 1st at the next would split one month into a year.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd

from classification.data.splits import SPLIT_NAMES, TEST, TRAIN, VAL
from classification.errors import DataError, UserError

log = logging.getLogger(__name__)

MissingDatetimeRule = Literal["drop", "train"]
NO_SPLIT = -1  # a crop left out (no datetime under the "drop" rule)
_DURATION = re.compile(r"^\s*(\d+)\s*([DWMY])\s*$", re.IGNORECASE)
_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_EXIF_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})")
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?$")  # after EXIF and offsets
_UTC_OFFSET = re.compile(r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(?:Z|[+-]\d{2}:?\d{2})$")  # after a time of day
MAX_SPAN_YEARS = 200
_MOST_OF_UNIT = {"D": MAX_SPAN_YEARS * 365, "W": MAX_SPAN_YEARS * 52, "M": MAX_SPAN_YEARS * 12, "Y": MAX_SPAN_YEARS}


@dataclass(frozen=True)
class TimeRule:
    """How val and test are taken from each location's time line (see the module doc)."""

    test_frac: float = 0.1
    val_frac: float = 0.2
    test_last: str | None = None
    val_last: str | None = None
    test_period: str | None = None
    val_period: str | None = None
    missing: MissingDatetimeRule = "drop"
    datetime_format: str | None = None  # strptime syntax; None: ISO 8601 or EXIF only

    def check(self) -> None:
        """Parse every flag once, so a typo fails before any work (one-line ``UserError``)."""
        for split in ("test", "val"):
            last, period = getattr(self, f"{split}_last"), getattr(self, f"{split}_period")
            if last and period:
                raise UserError(f"--{split}-last and --{split}-period: give one or the other")
            if last:
                parse_duration(last, f"--{split}-last")
            if period:
                parse_period(period, f"--{split}-period")
        if self.datetime_format is not None:
            check_datetime_format(self.datetime_format)


def check_datetime_format(fmt: str) -> None:
    """A ``--datetime-format`` must hold a strptime directive and a year (else every value would fail)."""
    if "%" not in fmt or not any(code in fmt for code in ("%Y", "%y")):
        raise UserError(f"--datetime-format: expected strptime syntax with a year, e.g. %d/%m/%Y %H:%M:%S, got {fmt!r}")


def parse_duration(text: str, flag: str) -> pd.DateOffset:
    """``"3M"`` → 3 months; units D, W, M, Y; a bad value is a ``UserError`` naming ``flag``."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise UserError(f"{flag}: expected a positive number and a unit D, W, M or Y (e.g. 3M), got {text!r}")
    number, unit = int(match.group(1)), match.group(2).upper()
    if number > _MOST_OF_UNIT[unit]:  # pandas' nanosecond times span 1677..2262: a longer span cannot be subtracted
        raise UserError(f"{flag}: {text.strip()!r} is longer than {MAX_SPAN_YEARS} years (at most {_MOST_OF_UNIT[unit]}{unit})")
    return pd.DateOffset(**{{"D": "days", "W": "weeks", "M": "months", "Y": "years"}[unit]: number})


def _period_bound(text: str, flag: str, end: bool) -> pd.Timestamp:
    """Start (or the end, exclusive) of ``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``."""
    text = text.strip()
    if not _DATE.match(text):
        raise UserError(f"{flag}: expected YYYY, YYYY-MM or YYYY-MM-DD, got {text!r}")
    try:
        start = pd.Timestamp(text if len(text) > 4 else f"{text}-01-01")
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a date") from None
    if not end:
        return start
    step = {4: pd.DateOffset(years=1), 7: pd.DateOffset(months=1), 10: pd.DateOffset(days=1)}[len(text)]
    try:
        return start + step
    except (OverflowError, ValueError):  # pandas' OutOfBoundsDatetime: the period ends after 2262-04-11
        raise UserError(f"{flag}: {text!r} lies beyond the dates this tool can hold (1677-09-22 to 2262-04-11)") from None


def parse_period(text: str, flag: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``"2011-06..2011-08"`` → [2011-06-01, 2011-09-01); one date is a period of its own length."""
    first, _, last = text.partition("..")
    start, end = _period_bound(first, flag, end=False), _period_bound(last or first, flag, end=True)
    if end <= start:
        raise UserError(f"{flag}: the period {text!r} ends before it starts")
    return start, end


def _datetime_text(values: pd.Series, fmt: str | None) -> pd.Series:
    """Stripped text, empty → NaN; without ``fmt``, EXIF dates as ISO and UTC offsets dropped (wall-clock time)."""
    text = values.fillna("").astype(str).str.strip()
    if fmt is None:
        text = text.str.replace(_EXIF_DATE, r"\1-\2-\3", regex=True)
        text = text.str.replace(_UTC_OFFSET, r"\1", regex=True)  # mixed offsets (DST) cannot parse together
    return text.where(text != "")


def parse_datetimes(values: pd.Series, fmt: str | None = None) -> pd.Series:
    """Datetimes from CCT/manifest text by one rule (ISO/EXIF, or ``fmt``); empty or unreadable → NaT."""
    text = _datetime_text(values, fmt)
    if fmt is None:
        parsed = pd.to_datetime(text.where(text.str.match(_ISO).fillna(False).astype(bool)), errors="coerce", format="ISO8601")
    else:
        parsed = pd.to_datetime(text, errors="coerce", format=fmt)
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_localize(None)
    parsed = parsed.where((parsed >= pd.Timestamp.min) & (parsed <= pd.Timestamp.max))  # sentinels (9999-12-31, year 1)
    return parsed.astype("datetime64[ns]")  # one unit, so the 1 ns steps of the rules are exact


def _fits(value: str, fmt: str | None) -> bool:
    """Whether ``value`` has the shape of the rule (a sentinel such as 9999-12-31 fits: it is read as missing)."""
    if fmt is None:
        return bool(_ISO.match(value))
    try:
        datetime.strptime(value, fmt)
    except ValueError:
        return False
    return True


def read_datetimes(values: pd.Series, fmt: str | None, source: str) -> pd.Series:
    """``parse_datetimes``, but a value that fits neither ISO/EXIF nor ``fmt`` is a ``DataError`` naming ``source``."""
    parsed = parse_datetimes(values, fmt)
    text = _datetime_text(values, fmt)
    for position in np.flatnonzero((text.notna() & parsed.isna()).to_numpy()):
        if not _fits(str(text.iloc[position]), fmt):
            value = str(values.iloc[position]).strip()
            rule = f"does not match --datetime-format {fmt!r}" if fmt else (
                "is not ISO 8601 (YYYY-MM-DD HH:MM:SS) nor EXIF (YYYY:MM:DD HH:MM:SS); "
                "give its format, e.g. --datetime-format '%d/%m/%Y %H:%M:%S' (day/month is never guessed)")
            raise DataError(f"{source}: datetime {value[:80]!r} {rule}")
    return parsed


def crop_times(frame: pd.DataFrame, fmt: str | None = None, source: str = "datetime") -> tuple[pd.Series, dict[str, int]]:
    """Each crop's moment: its sequence's first time (or its own); counts of filled and missing ones."""
    if "datetime" not in frame.columns:
        raise UserError("splits held out in time need datetimes: build with --mode csv from a CCT or crops manifest")
    own = read_datetimes(frame["datetime"], fmt, source)
    sequence = frame["seq_id"].fillna("").astype(str) if "seq_id" in frame.columns else pd.Series("", index=frame.index)
    group = np.where(sequence != "", frame["dataset"] + "\x1f" + frame["location"] + "\x1f" + sequence, frame.index.astype(str))
    times = own.groupby(group).transform("min")
    counts = {"with_datetime": int(own.notna().sum()), "filled_from_sequence": int((own.isna() & times.notna()).sum()),
              "without_datetime": int(times.isna().sum())}
    return times, counts


def _moments(frame: pd.DataFrame, times: pd.Series) -> pd.DataFrame:
    """One row per (location, time): its crops, sorted by location then time."""
    keys = frame["dataset"] + "\x1f" + frame["location"]
    moments = pd.DataFrame({"location": keys, "time": times}).dropna(subset=["time"])
    moments = moments.groupby(["location", "time"], sort=True).size().rename("crops").reset_index()
    moments["total"] = moments.groupby("location")["crops"].transform("sum")
    return moments


def _latest_share(moments: pd.DataFrame, eligible: pd.Series, share: float) -> pd.Series:
    """Eligible moments whose middle crop lies in the last ``share`` of their location's crops, counted back in time."""
    crops = moments["crops"].where(eligible, 0)
    after = crops[::-1].groupby(moments["location"][::-1]).cumsum()[::-1] - crops  # eligible crops later in time
    return eligible & (after + crops / 2 < share * moments["total"])


def _held_out(moments: pd.DataFrame, eligible: pd.Series, last: str | None, period: str | None, share: float,
              end: pd.Series, flag: str) -> pd.Series:
    """The moments of one held-out split: a period, the span ``[end − span, end)``, or the latest share."""
    if period:
        start, stop = parse_period(period, f"--{flag}-period")
        return eligible & (moments["time"] >= start) & (moments["time"] < stop)
    if last:
        span = parse_duration(last, f"--{flag}-last")
        try:
            start = end - span
        except (OverflowError, ValueError):  # a span reaching before 1677: it holds the whole time line
            start = pd.Series(pd.Timestamp.min, index=end.index)
        return eligible & (moments["time"] >= start) & (moments["time"] < end)
    return _latest_share(moments, eligible, share)


def assign_moments(moments: pd.DataFrame, rule: TimeRule) -> np.ndarray:
    """Split (0, 1, 2) of each moment: test first, then val from what is before test's first moment."""
    after_last = moments.groupby("location")["time"].transform("max") + pd.Timedelta(1, "ns")
    everything = pd.Series(True, index=moments.index)
    test = _held_out(moments, everything, rule.test_last, rule.test_period, rule.test_frac, after_last, "test")
    test_start = moments["time"].where(test).groupby(moments["location"]).transform("min").fillna(after_last)
    before_test = moments["time"] < test_start
    val = _held_out(moments, before_test & ~test, rule.val_last, rule.val_period, rule.val_frac, test_start, "val")
    split = np.full(len(moments), TRAIN, dtype=np.int8)
    split[val.to_numpy()] = VAL
    split[test.to_numpy()] = TEST
    return split


def time_split_of_crops(frame: pd.DataFrame, rule: TimeRule,
                        source: str = "datetime") -> tuple[np.ndarray, pd.Series, dict[str, int]]:
    """Per crop: its split by time (``NO_SPLIT`` for a crop left out), its moment, and the datetime counts;
    ``source`` (the CCT or manifest) names the file in the error for a datetime that cannot be read."""
    rule.check()
    times, counts = crop_times(frame, rule.datetime_format, source)
    if counts["without_datetime"] == len(frame):
        raise DataError("no crop has a datetime: splits cannot be held out in time (use --split-by location)")
    moments = _moments(frame, times)
    moments["split"] = assign_moments(moments, rule)
    keys = pd.MultiIndex.from_arrays([frame["dataset"] + "\x1f" + frame["location"], times])
    lookup = moments.set_index(["location", "time"])["split"]
    split = lookup.reindex(keys).to_numpy()
    missing = np.isnan(split)
    split = np.where(missing, NO_SPLIT if rule.missing == "drop" else TRAIN, split).astype(np.int8)
    if missing.any():
        action = "left out" if rule.missing == "drop" else "kept in train"
        log.warning("%d crops have no datetime (nor a sequence with one): %s (--missing-datetimes %s)",
                    int(missing.sum()), action, rule.missing)
    counts[f"without_datetime_{'dropped' if rule.missing == 'drop' else 'in_train'}"] = int(missing.sum())
    return split, times, counts


def _days(delta: pd.Series | pd.Timedelta) -> float:
    """A time difference in days, rounded for the report."""
    return round(pd.Timedelta(delta).total_seconds() / 86_400, 5)  # ~1 s resolution: a gap of seconds shows


def _pair_report(locations: pd.Series, times: pd.Series, split: np.ndarray, first: int, second: int) -> dict:
    """How far ``first`` and ``second`` are apart in time at the locations holding both."""
    a = pd.DataFrame({"location": locations[split == first], "time": times[split == first]}).dropna()
    b = pd.DataFrame({"location": locations[split == second], "time": times[split == second]}).dropna()
    shared = sorted(set(a["location"]) & set(b["location"]))
    if not shared:
        return {"locations_in_both": 0}
    a, b = a[a["location"].isin(shared)], b[b["location"].isin(shared)]
    span = b.groupby("location")["time"].agg(["min", "max"])
    inside = (a["time"] >= a["location"].map(span["min"])) & (a["time"] <= a["location"].map(span["max"]))
    nearest = pd.merge_asof(b.sort_values("time"), a.sort_values("time").rename(columns={"time": "other"}),
                            left_on="time", right_on="other", by="location", direction="nearest")
    gaps = (nearest["time"] - nearest["other"]).abs().groupby(nearest["location"]).min()
    return {
        "locations_in_both": len(shared),
        "locations_overlapping": int(a.loc[inside, "location"].nunique()),
        "min_gap_days": _days(gaps.min()),
        "median_gap_days": _days(gaps.median()),
    }


def time_report(locations: pd.Series, times: pd.Series, split: np.ndarray, counts: dict[str, int]) -> dict:
    """The report's ``time`` section: each split's period and how far the splits are apart at shared locations.

    ``locations_overlapping`` counts locations where a crop of the first split lies within the
    second split's time span there (0 for a clean time-held-out split); gaps are between the
    closest crops of the two splits at one location.
    """
    locations, times = locations.reset_index(drop=True), times.reset_index(drop=True)
    periods = {}
    for s, name in enumerate(SPLIT_NAMES):
        held = times[split == s].dropna()
        periods[name] = {"first": str(held.min()) if len(held) else None, "last": str(held.max()) if len(held) else None}
    pairs = {f"{SPLIT_NAMES[a]}/{SPLIT_NAMES[b]}": _pair_report(locations, times, split, a, b)
             for a, b in ((TRAIN, TEST), (TRAIN, VAL), (VAL, TEST))}
    kept = split != NO_SPLIT
    splits_per_location = pd.Series(split[kept]).groupby(locations[kept].to_numpy()).agg(["nunique", "first"])
    whole = splits_per_location[splits_per_location["nunique"] == 1]["first"].value_counts()
    return {"datetimes": counts, "periods": periods, "apart": pairs,
            "whole_locations": {name: int(whole.get(s, 0)) for s, name in enumerate(SPLIT_NAMES)}}


def time_warnings(report: dict, cut_locations: bool) -> list[str]:
    """Warnings for the split report: splits that overlap in time at a location, crops without a time, and
    (when ``cut_locations``, i.e. ``--split-by time``) locations held out whole because their record is short."""
    warnings = [f"{pair}: {row['locations_overlapping']} location(s) where they overlap in time"
                for pair, row in report["apart"].items() if row.get("locations_overlapping")]
    for name in ("val", "test") if cut_locations else ():
        if report["whole_locations"][name]:
            warnings.append(f"{report['whole_locations'][name]} location(s) entirely in {name}: their record"
                            " is shorter than the held-out span, or lies in the held-out period")
    counts = report["datetimes"]
    if counts.get("without_datetime"):
        action = "left out" if "without_datetime_dropped" in counts else "kept in train"
        warnings.append(f"{counts['without_datetime']} crop(s) without a datetime: {action}")
    return warnings
