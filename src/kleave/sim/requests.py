"""Requests to replay: synthesized from a rates file, or a request trace rescaled.

Both shapes end up as one `RequestSet` so the discrete-event engine sees no difference, and as
a `LengthShape` (normalized length quantiles) so the fluid model uses the same distribution.

Rates files carry only window means, so lengths are drawn around them: log-normal with
coefficient of variation `LENGTH_CV` (the public traces have input-length CV ~1), capped at the
model context. Arrivals within a window are Poisson at the window's rate. Everything is seeded.

`--rate-scale` on a request trace superposes copies: `floor(scale)` full copies plus one copy
thinned to the fractional part (scale < 1 thins the original). Every copied request moves by a
uniform jitter of up to `COPY_JITTER_S` so copies do not arrive in lock-step; jitter this small
keeps the trace's minute-scale bursts, which is what the bursty traces are for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kleave.traces import RateSeries, RequestTrace

FloatArray = npt.NDArray[np.float64]

LENGTH_CV = 1.0
MAX_CONTEXT_TOKENS = 131_072
COPY_JITTER_S = 1.0
SHAPE_POINTS = 32


@dataclass(frozen=True)
class RequestSet:
    """Arrivals (s, sorted) with input and output lengths (tokens)."""

    arrival_s: FloatArray
    isl: FloatArray
    osl: FloatArray
    duration_s: float

    def __len__(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True)
class LengthShape:
    """A length distribution as quantile points divided by the mean, with their weights.

    The fluid model multiplies these by a window's mean length; the points are denser in the
    upper tail because the longest prompts are the ones that miss a TTFT target."""

    isl: FloatArray
    osl: FloatArray
    weight: FloatArray

    @property
    def osl_second_moment(self) -> float:
        """E[osl^2] / E[osl]^2: how much longer the average in-flight sequence is."""
        return float(np.sum(self.weight * self.osl**2) / np.sum(self.weight * self.osl) ** 2)


def _shape_probabilities() -> tuple[FloatArray, FloatArray]:
    body = SHAPE_POINTS * 3 // 4
    tail = SHAPE_POINTS - body
    edges = np.concatenate([np.linspace(0.0, 0.96, body + 1), np.linspace(0.96, 1.0, tail + 1)[1:]])
    return (edges[:-1] + edges[1:]) / 2, np.diff(edges)


def lognormal_shape(cv: float = LENGTH_CV) -> LengthShape:
    """The shape `synthesize` draws from (mean 1)."""
    from statistics import NormalDist

    p, w = _shape_probabilities()
    sigma = math.sqrt(math.log1p(cv * cv))
    z = np.array([NormalDist().inv_cdf(float(q)) for q in p])
    points = np.exp(sigma * z - sigma * sigma / 2)
    points = points / float(np.sum(points * w))
    return LengthShape(points, points.copy(), w)


def empirical_shape(isl: FloatArray, osl: FloatArray) -> LengthShape:
    """The shape of a request trace's lengths (each normalized by its mean)."""
    p, w = _shape_probabilities()
    isl_points = np.quantile(isl, p) / float(np.mean(isl))
    osl_points = np.quantile(osl, p) / float(np.mean(osl))
    return LengthShape(
        isl_points / float(np.sum(isl_points * w)), osl_points / float(np.sum(osl_points * w)), w
    )


def _lognormal(rng: np.random.Generator, mean: FloatArray, cv: float) -> FloatArray:
    sigma = math.sqrt(math.log1p(cv * cv))
    drawn = rng.lognormal(-sigma * sigma / 2, sigma, size=len(mean)) * mean
    return np.clip(np.rint(drawn), 1, MAX_CONTEXT_TOKENS)


def synthesize(rates: RateSeries, scale: float = 1.0, seed: int = 0) -> RequestSet:
    """Poisson arrivals at `scale` x each window's rate; log-normal lengths around its means."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.maximum(rates.request_rate, 0.0) * scale * rates.window_s)
    index = np.repeat(np.arange(len(rates)), counts)
    start = rates.window_start_s - rates.window_start_s[0]
    arrival = start[index] + rng.random(len(index)) * rates.window_s[index]
    order = np.argsort(arrival, kind="stable")
    arrival, index = arrival[order], index[order]
    isl = _lognormal(rng, rates.mean_input_tokens[index], LENGTH_CV)
    osl = _lognormal(rng, rates.mean_output_tokens[index], LENGTH_CV)
    osl = np.minimum(osl, np.maximum(MAX_CONTEXT_TOKENS - isl, 1))
    return RequestSet(arrival, isl, osl, rates.duration_s)


def rescale(trace: RequestTrace, scale: float = 1.0, seed: int = 0) -> RequestSet:
    """Superpose copies of a request trace (see the module docstring)."""
    if scale <= 0:
        raise ValueError(f"rate scale must be positive, got {scale}")
    rng = np.random.default_rng(seed)
    duration = trace.duration_s
    whole = math.floor(scale)
    parts: list[tuple[FloatArray, FloatArray, FloatArray]] = []
    for copy in range(whole + 1):
        keep = np.ones(len(trace), dtype=bool)
        if copy == whole:
            keep = rng.random(len(trace)) < scale - whole
        ts = trace.timestamp_s[keep]
        if copy > 0 or scale != whole:
            ts = ts + rng.uniform(-COPY_JITTER_S, COPY_JITTER_S, size=len(ts))
            ts = np.clip(ts, 0.0, duration)
        parts.append((ts, trace.input_tokens[keep], trace.output_tokens[keep]))
    arrival = np.concatenate([p[0] for p in parts])
    order = np.argsort(arrival, kind="stable")
    isl = np.concatenate([p[1] for p in parts])[order]
    osl = np.concatenate([p[2] for p in parts])[order]
    return RequestSet(arrival[order], isl, osl, duration)


def trace_rates(trace: RequestTrace | RateSeries, window_s: float) -> RateSeries:
    """Window rates of either shape: a request trace is aggregated, a rates file resampled to
    `window_s` when that divides its windows (finer copies of each window), else kept."""
    if isinstance(trace, RequestTrace):
        return trace.to_rates(window_s)
    step = trace.step_s
    ratio = round(step / window_s)
    if ratio <= 1 or not math.isclose(ratio * window_s, step):
        return trace
    n = len(trace) * ratio
    offsets = np.tile(np.arange(ratio) * window_s, len(trace))
    return RateSeries(
        trace.path,
        np.repeat(trace.window_start_s, ratio) + offsets,
        np.full(n, float(window_s)),
        np.repeat(trace.request_rate, ratio),
        np.repeat(trace.mean_input_tokens, ratio),
        np.repeat(trace.mean_output_tokens, ratio),
    )
