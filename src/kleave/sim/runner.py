"""From a trace file and options to scored runs: the part of `kleave simulate` without I/O.

The engine is chosen by size: the discrete-event model up to `DES_MAX_REQUESTS` requests (an
hour of the public request traces at the scales used), the fluid model beyond (14 days of a
rates file is hundreds of millions of requests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from kleave.planner.capacity import CapacityProfile, ProfileTable
from kleave.planner.solver import PoolLimits, Slo
from kleave.sim import engine, fluid
from kleave.sim.cluster import Policy
from kleave.sim.metrics import SimResult
from kleave.sim.policies import make_policy
from kleave.sim.requests import (
    RequestSet,
    empirical_shape,
    lognormal_shape,
    rescale,
    synthesize,
    trace_rates,
)
from kleave.sim.scenario import Scenario, auto_scale, scaled, window_peaks
from kleave.traces import RateSeries, RequestTrace, read_trace

DES_MAX_REQUESTS = 2_000_000
DEFAULT_INTERVAL_S = 60.0
TICK_S = 10.0
"""Metrics scrape and policy tick: the finest time scale a planner sees."""
FLUID_REQUEST_WINDOW_S = 1.0
"""A request trace enters the fluid model as 1-s rates: its bursts are seconds long."""


@dataclass(frozen=True)
class Options:
    trace: str
    policies: tuple[str, ...]
    rate_scale: float | None = None
    """None: pick one (`scenario.auto_scale`)."""
    slo: Slo = field(default_factory=Slo)
    startup_s: float = 60.0
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    prefill_gpu: str = "H100-SXM"
    decode_gpu: str = "H100-SXM"
    gpus_per_replica: int = 1
    topology: str = "PD"
    interval_s: float | None = None
    """None: 60 s, or a rates file's window when longer (its load changes no faster)."""
    max_replicas: int = 64
    engine: str = "auto"
    seed: int = 0
    begin_s: float = 0.0
    duration_s: float | None = None


@dataclass(frozen=True)
class Run:
    options: Options
    scale: float
    interval_s: float
    engine: str
    requests: float
    results: list[SimResult]
    wall_s: dict[str, float]


def profiles_for(options: Options) -> dict[str, CapacityProfile]:
    table = ProfileTable()
    g = options.gpus_per_replica
    return {
        "prefill": table.lookup(options.model, options.prefill_gpu, g, "prefill"),
        "decode": table.lookup(options.model, options.decode_gpu, g, "decode"),
    }


def _slice_requests(trace: RequestTrace, begin: float, duration: float | None) -> RequestTrace:
    end = math.inf if duration is None else begin + duration
    keep = (trace.timestamp_s >= begin) & (trace.timestamp_s < end)
    ts = trace.timestamp_s[keep] - begin
    return RequestTrace(trace.path, ts, trace.input_tokens[keep], trace.output_tokens[keep])


def _slice_rates(rates: RateSeries, begin: float, duration: float | None) -> RateSeries:
    start = rates.window_start_s - rates.window_start_s[0]
    end = math.inf if duration is None else begin + duration
    keep = (start >= begin - 1e-9) & (start < end - 1e-9)
    return RateSeries(
        rates.path,
        rates.window_start_s[keep] - rates.window_start_s[keep][:1],
        rates.window_s[keep],
        rates.request_rate[keep],
        rates.mean_input_tokens[keep],
        rates.mean_output_tokens[keep],
    )


PolicyMaker = Callable[[Scenario], Policy]


def run(options: Options, variants: Mapping[str, PolicyMaker] | None = None) -> Run:
    """Score `options.policies`, or `variants` (label -> policy maker; results are labelled so)
    instead, on one scenario: every policy sees the same requests."""
    if options.topology != "PD":
        raise ValueError(f"the simulator models the PD topology only, got {options.topology!r}")
    trace = read_trace(options.trace)
    if isinstance(trace, RequestTrace):
        trace = _slice_requests(trace, options.begin_s, options.duration_s)
    else:
        trace = _slice_rates(trace, options.begin_s, options.duration_s)
    if not len(trace):
        raise ValueError(f"{options.trace}: no data in the chosen slice")
    profiles = profiles_for(options)
    interval = options.interval_s
    if interval is None:
        interval = DEFAULT_INTERVAL_S
        if isinstance(trace, RateSeries):
            interval = max(interval, trace.step_s)
    loads = trace_rates(trace, interval)
    peaks = None
    if isinstance(trace, RequestTrace):
        peaks = window_peaks(trace, interval, TICK_S)
    scale = options.rate_scale
    if scale is None:
        scale = auto_scale(loads, profiles, options.slo, topology=options.topology, peaks=peaks)
    limits = {
        role: PoolLimits(1, options.max_replicas, options.gpus_per_replica) for role in profiles
    }
    scenario = Scenario(
        profiles=profiles,
        slo=options.slo,
        startup_s=options.startup_s,
        loads=scaled(loads, scale),
        peaks=None if peaks is None else peaks * scale,
        tick_s=TICK_S,
        limits=limits,
        interval_s=interval,
        topology=options.topology,
    )
    if isinstance(trace, RequestTrace):
        expected = len(trace) * scale
    else:
        expected = float(np.sum(trace.request_rate * trace.window_s)) * scale
    kind = options.engine
    if kind == "auto":
        kind = "des" if expected <= DES_MAX_REQUESTS else "fluid"
    requests: RequestSet | None = None
    if kind == "des":
        if isinstance(trace, RequestTrace):
            requests = rescale(trace, scale, options.seed)
        else:
            requests = synthesize(trace, scale, options.seed)
    if isinstance(trace, RequestTrace):
        shape = empirical_shape(trace.input_tokens, trace.output_tokens)
        fluid_rates = scaled(trace.to_rates(FLUID_REQUEST_WINDOW_S), scale)
    else:
        shape = lognormal_shape()
        fluid_rates = scaled(trace, scale)
    results: list[SimResult] = []
    wall: dict[str, float] = {}
    makers = variants or {name: partial(make_policy, name) for name in options.policies}
    for label, make in makers.items():
        policy = make(scenario)
        start = time.perf_counter()
        if requests is not None:
            result = engine.simulate(
                requests, profiles, options.slo, policy, startup_s=options.startup_s
            )
        else:
            result = fluid.simulate(
                fluid_rates, shape, profiles, options.slo, policy, startup_s=options.startup_s
            )
        wall[label] = time.perf_counter() - start
        results.append(replace(result, policy=label))
    n = float(len(requests)) if requests is not None else expected
    return Run(options, scale, interval, kind, n, results, wall)
