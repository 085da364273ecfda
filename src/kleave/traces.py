"""Readers for the two public trace shapes (per-request rows and per-window rates).

The planner, the simulator and the load generator all take a trace path from the user, so a
malformed file must fail with the file, the line and what was expected, never a traceback.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

REQUEST_COLUMNS = ("timestamp_s", "input_tokens", "output_tokens")
RATE_COLUMNS = (
    "window_start_s",
    "window_s",
    "request_rate",
    "mean_input_tokens",
    "mean_output_tokens",
)


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, line and expectation."""


@dataclass(frozen=True)
class RequestTrace:
    """One row per request: arrival time (s from the first request) and token lengths."""

    path: str
    timestamp_s: FloatArray
    input_tokens: FloatArray
    output_tokens: FloatArray

    @property
    def duration_s(self) -> float:
        return float(self.timestamp_s[-1]) if len(self.timestamp_s) else 0.0

    def __len__(self) -> int:
        return len(self.timestamp_s)

    def to_rates(self, window_s: float) -> RateSeries:
        """Aggregate into regular windows: rate (req/s) and mean lengths; empty windows get
        rate 0 and carry the previous window's means (a length of 0 would be a fake signal)."""
        if window_s <= 0:
            raise TraceError(f"{self.path}: window must be positive, got {window_s}")
        count = max(1, math.ceil((self.duration_s + 1e-9) / window_s))
        index = np.minimum((self.timestamp_s // window_s).astype(np.int64), count - 1)
        n = np.bincount(index, minlength=count).astype(np.float64)
        isl_sum = np.bincount(index, weights=self.input_tokens, minlength=count)
        osl_sum = np.bincount(index, weights=self.output_tokens, minlength=count)
        with np.errstate(invalid="ignore", divide="ignore"):
            isl = np.where(n > 0, isl_sum / np.maximum(n, 1), np.nan)
            osl = np.where(n > 0, osl_sum / np.maximum(n, 1), np.nan)
        isl = _carry_forward(isl)
        osl = _carry_forward(osl)
        return RateSeries(
            path=self.path,
            window_start_s=np.arange(count, dtype=np.float64) * window_s,
            window_s=np.full(count, float(window_s)),
            request_rate=n / window_s,
            mean_input_tokens=isl,
            mean_output_tokens=osl,
        )


@dataclass(frozen=True)
class RateSeries:
    """One row per window: start, length, mean request rate (req/s) and mean token lengths."""

    path: str
    window_start_s: FloatArray
    window_s: FloatArray
    request_rate: FloatArray
    mean_input_tokens: FloatArray
    mean_output_tokens: FloatArray

    def __len__(self) -> int:
        return len(self.window_start_s)

    @property
    def step_s(self) -> float:
        """The (regular) window length; readers reject irregular files."""
        return float(self.window_s[0]) if len(self.window_s) else 0.0

    @property
    def duration_s(self) -> float:
        if not len(self):
            return 0.0
        return float(self.window_start_s[-1] + self.window_s[-1] - self.window_start_s[0])

    def season_length(self, period_s: float = 86_400.0) -> int | None:
        """Windows per day when the series spans at least two days, else None."""
        step = self.step_s
        if step <= 0 or self.duration_s < 2 * period_s:
            return None
        m = round(period_s / step)
        return m if m >= 2 else None


def _carry_forward(values: FloatArray) -> FloatArray:
    out = values.copy()
    last = math.nan
    for i, v in enumerate(out):
        if math.isnan(v):
            out[i] = last
        else:
            last = v
    first = next((v for v in out if not math.isnan(v)), 0.0)
    return np.where(np.isnan(out), first, out)


def _header(path: Path) -> list[str]:
    try:
        with path.open(newline="") as handle:
            first = handle.readline()
    except OSError as error:
        raise TraceError(f"{path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise TraceError(f"{path}: line 1: not a text CSV file ({error.reason})") from error
    return [cell.strip() for cell in first.strip().split(",")] if first.strip() else []


def _parse_float(path: Path, line: int, column: str, text: str, *, minimum: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(
            f"{path}: line {line}: column {column!r} must be a number, got {text!r}"
        ) from None
    if not math.isfinite(value) or value < minimum:
        raise TraceError(
            f"{path}: line {line}: column {column!r} must be a finite number >= {minimum:g}, "
            f"got {text!r}"
        )
    return value


def _rows(path: Path, expected: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    header = _header(path)
    if tuple(header[: len(expected)]) != expected:
        raise TraceError(
            f"{path}: line 1: expected a header starting with {','.join(expected)}, "
            f"got {','.join(header) or '(empty file)'}"
        )
    rows: list[tuple[int, list[str]]] = []
    try:
        with path.open(newline="") as handle:
            reader = csv.reader(handle)
            next(reader, None)
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) < len(expected):
                    raise TraceError(
                        f"{path}: line {line}: expected {len(expected)} columns "
                        f"({','.join(expected)}), got {len(row)}"
                    )
                rows.append((line, row))
    except UnicodeDecodeError as error:
        raise TraceError(f"{path}: not a text CSV file ({error.reason})") from error
    except csv.Error as error:
        raise TraceError(f"{path}: malformed CSV: {error}") from error
    if not rows:
        raise TraceError(f"{path}: no data rows after the header")
    return rows


def read_requests(path: str | Path) -> RequestTrace:
    """Read `timestamp_s,input_tokens,output_tokens[,...]`; timestamps must not go backwards."""
    file = Path(path)
    rows = _rows(file, REQUEST_COLUMNS)
    ts = np.empty(len(rows))
    isl = np.empty(len(rows))
    osl = np.empty(len(rows))
    previous = -math.inf
    for i, (line, row) in enumerate(rows):
        t = _parse_float(file, line, "timestamp_s", row[0], minimum=0.0)
        if t < previous:
            raise TraceError(
                f"{file}: line {line}: timestamp_s {row[0]} goes backwards "
                f"(previous {previous:g}); rows must be sorted by time"
            )
        previous = t
        ts[i] = t
        isl[i] = _parse_float(file, line, "input_tokens", row[1], minimum=1.0)
        osl[i] = _parse_float(file, line, "output_tokens", row[2], minimum=1.0)
    return RequestTrace(str(file), ts - ts[0], isl, osl)


def read_rates(path: str | Path) -> RateSeries:
    """Read `window_start_s,window_s,request_rate,mean_input_tokens,mean_output_tokens`.

    Windows must be regular and contiguous. Zero-rate windows (gaps in the source) are kept as
    0 with lengths carried from the previous window, so forecasters see the gap honestly."""
    file = Path(path)
    rows = _rows(file, RATE_COLUMNS)
    n = len(rows)
    start = np.empty(n)
    width = np.empty(n)
    rate = np.empty(n)
    isl = np.empty(n)
    osl = np.empty(n)
    for i, (line, row) in enumerate(rows):
        start[i] = _parse_float(file, line, "window_start_s", row[0], minimum=0.0)
        width[i] = _parse_float(file, line, "window_s", row[1], minimum=0.0)
        if width[i] <= 0:
            raise TraceError(f"{file}: line {line}: column 'window_s' must be > 0, got {row[1]!r}")
        rate[i] = _parse_float(file, line, "request_rate", row[2], minimum=0.0)
        isl[i] = _parse_float(file, line, "mean_input_tokens", row[3], minimum=0.0)
        osl[i] = _parse_float(file, line, "mean_output_tokens", row[4], minimum=0.0)
        if i and not math.isclose(width[i], width[0]):
            raise TraceError(
                f"{file}: line {line}: window_s {row[1]} differs from the first row's "
                f"{width[0]:g}; windows must be regular"
            )
        if i and not math.isclose(start[i], start[i - 1] + width[i - 1], abs_tol=1e-6):
            raise TraceError(
                f"{file}: line {line}: window_start_s {row[0]} is not the previous window's end "
                f"({start[i - 1] + width[i - 1]:g}); windows must be contiguous and sorted"
            )
    # A window with no requests may carry length 0; treat it as unknown, not as short requests.
    isl = _carry_forward(np.where((rate > 0) & (isl > 0), isl, np.nan))
    osl = _carry_forward(np.where((rate > 0) & (osl > 0), osl, np.nan))
    return RateSeries(str(file), start, width, rate, isl, osl)


def trace_kind(path: str | Path) -> str:
    """'requests' or 'rates', from the header; anything else is a TraceError."""
    file = Path(path)
    header = tuple(_header(file))
    if header[: len(REQUEST_COLUMNS)] == REQUEST_COLUMNS:
        return "requests"
    if header[: len(RATE_COLUMNS)] == RATE_COLUMNS:
        return "rates"
    raise TraceError(
        f"{file}: line 1: expected a header starting with {','.join(REQUEST_COLUMNS)} "
        f"(requests) or {','.join(RATE_COLUMNS)} (rates), got {','.join(header) or '(empty)'}"
    )


def read_trace(path: str | Path) -> RequestTrace | RateSeries:
    """Read either shape, chosen by the header."""
    return read_requests(path) if trace_kind(path) == "requests" else read_rates(path)
