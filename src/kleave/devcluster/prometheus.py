"""A real Prometheus server for the tests and the demo, scraping static targets on 127.0.0.1.

The planner reads load through PromQL, so tests run the real server rather than a fake: rate
windows, histogram quantiles and staleness then behave as they will in a cluster. Stopping
and starting again keeps the port and the TSDB, which is how tests model a Prometheus outage.
"""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yaml

from kleave.devcluster import processes
from kleave.devcluster.errors import DevClusterError, StartupError

DEFAULT_BINARY = Path("/usr/bin/prometheus")


class PrometheusNotFoundError(DevClusterError):
    """The prometheus binary is not installed."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One `host:port` to scrape, with labels added to every series it exports."""

    address: str
    job: str = "kleave"
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def find_binary(binary: str | Path | None = None) -> Path:
    """The prometheus executable: `binary`, else Debian's path, else PATH."""
    if binary is not None:
        path = Path(binary)
        if not path.is_file():
            raise PrometheusNotFoundError(f"prometheus binary {path} does not exist")
        return path
    if DEFAULT_BINARY.is_file():
        return DEFAULT_BINARY
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusNotFoundError(
            f"prometheus not found at {DEFAULT_BINARY} or on PATH: run `make prometheus` "
            "(or `sudo apt-get install prometheus`)"
        )
    return Path(found)


def prometheus_duration(seconds: float) -> str:
    """Prometheus config durations have no fractions: whole seconds, else milliseconds."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render_config(targets: Sequence[ScrapeTarget], scrape_interval_s: float) -> dict[str, object]:
    """prometheus.yml: one scrape job per job name, one static group per target."""
    interval = prometheus_duration(scrape_interval_s)
    # The timeout may not exceed the interval (Prometheus refuses the config otherwise).
    timeout = prometheus_duration(min(scrape_interval_s, 10.0))
    jobs: dict[str, list[ScrapeTarget]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target)
    scrape_configs = []
    for job, members in jobs.items():
        paths = {member.metrics_path for member in members}
        if len(paths) > 1:
            raise ValueError(f"scrape job {job!r} mixes metrics paths {sorted(paths)}")
        scrape_configs.append(
            {
                "job_name": job,
                "metrics_path": paths.pop(),
                "static_configs": [
                    {"targets": [member.address], "labels": dict(member.labels)}
                    for member in members
                ],
            }
        )
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": timeout,
            "evaluation_interval": interval,
        },
        "scrape_configs": scrape_configs,
    }


class PrometheusServer:
    """`/usr/bin/prometheus` on 127.0.0.1 with its config, TSDB and log in `state_dir`."""

    def __init__(
        self,
        state_dir: Path,
        targets: Sequence[ScrapeTarget] = (),
        *,
        scrape_interval_s: float = 1.0,
        port: int = 0,
        binary: str | Path | None = None,
        ready_timeout_s: float = 30.0,
    ) -> None:
        if scrape_interval_s <= 0:
            raise ValueError(f"scrape interval must be positive, got {scrape_interval_s}")
        self.state_dir = Path(state_dir)
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.binary = find_binary(binary)
        self.ready_timeout_s = ready_timeout_s
        self._requested_port = port
        self._port = port
        self._pid: int | None = None

    @property
    def config_path(self) -> Path:
        return self.state_dir / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "prometheus.log"

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("Prometheus has not been started yet: its port is not chosen")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._pid is not None and processes.is_alive(self._pid)

    def start(self) -> None:
        """Start (or restart on the same port and TSDB, so scraped data survives); returns
        once `/-/ready` answers. A no-op while running."""
        if self.running:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.config_path.write_text(
            yaml.safe_dump(render_config(self.targets, self.scrape_interval_s), sort_keys=False)
        )
        # A port we picked ourselves can be taken between probe and bind: pick another then,
        # but only before the first start; a restart keeps its port (the reader's URL).
        may_repick = not self._requested_port and not self._port
        for attempt in range(3):
            if not self._port:
                self._port = processes.free_ports(1)[0]
            self._pid = processes.start(self._argv(), self.log_path)
            try:
                self._wait_ready()
                return
            except StartupError:
                self._kill()
                in_use = any("address already in use" in line for line in self._log_tail(5))
                if not (may_repick and in_use and attempt < 2):
                    raise
                self._port = 0

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Prometheus flushes its head block), then SIGKILL after `timeout_s`."""
        self._kill(timeout_s)

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address=127.0.0.1:{self._port}",
            "--web.enable-lifecycle",
            "--log.level=info",
        ]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        ready = f"http://127.0.0.1:{self._port}/-/ready"
        while time.monotonic() < deadline:
            if self._pid is None or not processes.is_alive(self._pid):
                raise StartupError(
                    f"Prometheus exited while starting (log {self.log_path}): "
                    + " | ".join(self._log_tail(5))
                )
            try:
                with urllib.request.urlopen(ready, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise StartupError(
            f"Prometheus did not become ready at {ready} within {self.ready_timeout_s:g}s "
            f"(log {self.log_path})"
        )

    def _kill(self, timeout_s: float = 10.0) -> None:
        if self._pid is not None:
            processes.stop([self._pid], timeout=timeout_s)
            self._pid = None

    def _log_tail(self, lines: int = 40) -> list[str]:
        return processes.log_tail(self.log_path, lines)
