"""Build the pinned control-plane binaries and helm from Go modules into the cache, once.

Kubernetes is built through a wrapper module: `k8s.io/kubernetes` requires its staging modules
(`k8s.io/api`, `k8s.io/apiserver`, ...) at v0.0.0 and points them at ./staging with replace lines
that Go ignores in a dependency, so the wrapper replaces each with its published v0.X.Y.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kleave.devcluster.errors import BuildError, ToolchainMissingError
from kleave.devcluster.paths import Binaries
from kleave.devcluster.versions import (
    ETCD_VERSION,
    HELM_VERSION,
    KUBERNETES_VERSION,
    KWOK_VERSION,
    MIN_GO,
    staging_version,
)

Progress = Callable[[str], None]

KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")

KWOK_STAGE_FILES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
"""kwok v0.8 has no built-in stages: these make nodes Ready, keep their leases, and run pods."""

_HEARTBEAT_SECONDS = 60.0


def staging_replaces(
    kubernetes_gomod: str, kubernetes_version: str = KUBERNETES_VERSION
) -> list[str]:
    """Replace lines for the staging modules `k8s.io/kubernetes` requires at v0.0.0."""
    modules = sorted(
        set(re.findall(r"^\s*(k8s\.io/[\w.\-/]+)\s+v0\.0\.0\s*$", kubernetes_gomod, re.M))
    )
    if not modules:
        raise ValueError("no staging modules (k8s.io/* v0.0.0) found in k8s.io/kubernetes's go.mod")
    published = staging_version(kubernetes_version)
    return [f"replace {module} => {module} {published}" for module in modules]


def version_ldflags(kubernetes_version: str = KUBERNETES_VERSION) -> str:
    """Linker flags that stamp the release into `--version` and the /version endpoint."""
    major, minor, _ = kubernetes_version.split(".")
    values = {
        "gitVersion": f"v{kubernetes_version}",
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {package}.{key}={value}" for key, value in values.items()]
    return " ".join(flags)


def helm_ldflags(
    helm_version: str = HELM_VERSION, kubernetes_version: str = KUBERNETES_VERSION
) -> str:
    """Helm's own release flags: `helm version` names the release (not "v3.19+unreleased"),
    and lint and template assume the Kubernetes version the cluster runs, not 1.20."""
    major, minor, _ = kubernetes_version.split(".")
    flags = [
        "-s",
        "-w",
        f"-X helm.sh/helm/v3/internal/version.version=v{helm_version}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor={major}", f"-X {package}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def parse_go_version(output: str) -> tuple[int, int]:
    """`go version go1.26.8 linux/amd64` -> (1, 26)."""
    match = re.search(r"go(\d+)\.(\d+)", output)
    if not match:
        raise ValueError(f"cannot read a Go version from {output.strip()!r}")
    return int(match.group(1)), int(match.group(2))


def check_go_toolchain() -> str:
    """Return the `go` path, or say exactly what to install."""
    go = shutil.which("go")
    wanted = ".".join(map(str, MIN_GO))
    if go is None:
        raise ToolchainMissingError(
            f"the Go toolchain (go >= {wanted}) is not on PATH; it builds the local control plane: "
            f"install Go {wanted}+ and retry"
        )
    output = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout
    found = parse_go_version(output)
    if found < MIN_GO:
        raise ToolchainMissingError(
            f"Go {found[0]}.{found[1]} is too old to build the control plane (needs >= {wanted}): "
            f"install Go {wanted}+ and retry"
        )
    return go


class Builder:
    """Builds each missing component; a `.built` stamp marks a finished one."""

    def __init__(self, binaries: Binaries, progress: Progress = print) -> None:
        self.binaries = binaries
        self.progress = progress
        self._go: str | None = None

    def missing(self) -> list[str]:
        """Components that still need a build."""
        b = self.binaries
        return [
            name
            for name, d in self._components()
            if not (d / ".built").exists() or not _has_bins(b, name)
        ]

    def ensure(self) -> Binaries:
        """Build whatever is missing; a no-op (no Go needed) when everything is cached."""
        todo = self.missing()
        if not todo:
            return self.binaries
        self._go = check_go_toolchain()
        self.binaries.logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.progress(
            f"==> building {', '.join(todo)} into {self.binaries.root} (first run: minutes)"
        )
        for name, directory in self._components():
            if name in todo:
                shutil.rmtree(directory / ".built", ignore_errors=True)
                getattr(self, f"_build_{name}")(directory)
                (directory / ".built").write_text(
                    time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime())
                )
        self.progress(f"==> control plane built in {time.monotonic() - started:.0f}s")
        return self.binaries

    def _components(self) -> list[tuple[str, Path]]:
        b = self.binaries
        return [
            ("kubernetes", b.kubernetes_dir),
            ("etcd", b.etcd_dir),
            ("kwok", b.kwok_dir),
            ("helm", b.helm_dir),
        ]

    def _build_kubernetes(self, directory: Path) -> None:
        src = _fresh_dir(directory / "src")
        gomod_path = self._module_info("kubernetes", f"k8s.io/kubernetes@v{KUBERNETES_VERSION}")[
            "GoMod"
        ]
        replaces = staging_replaces(Path(gomod_path).read_text())
        (src / "go.mod").write_text(
            "module kleave.local/kubernetes-build\n\ngo 1.24\n\n"
            f"require k8s.io/kubernetes v{KUBERNETES_VERSION}\n\n" + "\n".join(replaces) + "\n"
        )
        packages = [f"k8s.io/kubernetes/cmd/{cmd}" for cmd in KUBERNETES_COMMANDS]
        self._go_run("kubernetes", ["get", *(f"{p}@v{KUBERNETES_VERSION}" for p in packages)], src)
        self.progress(
            f"    compiling {', '.join(KUBERNETES_COMMANDS)} v{KUBERNETES_VERSION} "
            "(cold: about 5 min on 2 cores)"
        )
        out = directory / "bin"
        out.mkdir(exist_ok=True)
        self._go_run(
            "kubernetes", ["build", "-ldflags", version_ldflags(), "-o", f"{out}/", *packages], src
        )

    def _build_etcd(self, directory: Path) -> None:
        src = _fresh_dir(directory / "src")
        (src / "go.mod").write_text("module kleave.local/etcd-build\n\ngo 1.25\n")
        self._go_run("etcd", ["get", f"go.etcd.io/etcd/server/v3@v{ETCD_VERSION}"], src)
        self.progress(f"    compiling etcd v{ETCD_VERSION}")
        (directory / "bin").mkdir(exist_ok=True)
        self._go_run(
            "etcd",
            ["build", "-o", str(directory / "bin" / "etcd"), "go.etcd.io/etcd/server/v3"],
            src,
        )

    def _build_kwok(self, directory: Path) -> None:
        self.progress(f"    compiling kwok v{KWOK_VERSION}")
        (directory / "bin").mkdir(parents=True, exist_ok=True)
        self._go_run(
            "kwok",
            ["install", f"sigs.k8s.io/kwok/cmd/kwok@v{KWOK_VERSION}"],
            directory,
            extra_env={"GOBIN": str(directory / "bin")},
        )
        module_dir = Path(self._module_info("kwok", f"sigs.k8s.io/kwok@v{KWOK_VERSION}")["Dir"])
        stages = _fresh_dir(directory / "stages")
        for relative in KWOK_STAGE_FILES:
            source = module_dir / relative
            if not source.is_file():
                raise BuildError(
                    "kwok",
                    str(self._log("kwok")),
                    f"stage file {relative} is missing from the kwok module",
                )
            shutil.copyfile(source, stages / Path(relative).name)

    def _build_helm(self, directory: Path) -> None:
        # helm's go.mod has no replace lines, so `go install pkg@version` builds it as released.
        self.progress(f"    compiling helm v{HELM_VERSION}")
        (directory / "bin").mkdir(parents=True, exist_ok=True)
        self._go_run(
            "helm",
            [
                "install",
                "-trimpath",
                "-ldflags",
                helm_ldflags(),
                f"helm.sh/helm/v3/cmd/helm@v{HELM_VERSION}",
            ],
            directory,
            extra_env={"GOBIN": str(directory / "bin"), "CGO_ENABLED": "0"},
        )

    def _module_info(self, step: str, module: str) -> dict[str, str]:
        output = self._go_run(
            step, ["mod", "download", "-json", module], self.binaries.root, capture=True
        )
        info: dict[str, str] = json.loads(output)
        if "Error" in info:
            raise BuildError(
                step, str(self._log(step)), f"go mod download {module}: {info['Error']}"
            )
        return info

    def _log(self, step: str) -> Path:
        return self.binaries.logs / f"build-{step}.log"

    def _go_run(
        self,
        step: str,
        args: Sequence[str],
        cwd: Path,
        *,
        extra_env: dict[str, str] | None = None,
        capture: bool = False,
    ) -> str:
        """Run `go ARGS`, appending its output to the step's log; heartbeat while it runs."""
        assert self._go is not None
        log_path = self._log(step)
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod", **(extra_env or {})}
        command = [self._go, *args]
        with log_path.open("a") as log:
            log.write(f"$ (cd {cwd} && {' '.join(command)})\n")
            log.flush()
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE if capture else log,
                stderr=log,
                text=True,
            )
            started = time.monotonic()
            while True:
                try:
                    stdout, _ = process.communicate(timeout=_HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    self.progress(
                        f"    ... go {args[0]} ({step}) still running, "
                        f"{time.monotonic() - started:.0f}s"
                    )
        if capture and stdout:
            with log_path.open("a") as log:
                log.write(stdout)
        if process.returncode != 0:
            raise BuildError(
                step,
                str(log_path),
                f"`go {' '.join(args[:2])}` exited {process.returncode}: "
                + _go_error(stdout, log_path),
            )
        return stdout or ""


def _has_bins(binaries: Binaries, component: str) -> bool:
    paths = {
        "kubernetes": [
            binaries.kube_apiserver,
            binaries.kube_controller_manager,
            binaries.kube_scheduler,
        ],
        "etcd": [binaries.etcd],
        "kwok": [binaries.kwok, *(binaries.kwok_stages / Path(f).name for f in KWOK_STAGE_FILES)],
        "helm": [binaries.helm],
    }[component]
    return all(p.is_file() for p in paths)


def _fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _go_error(stdout: str | None, log_path: Path) -> str:
    """The most telling line: `-json` commands report errors in stdout, others on stderr."""
    try:
        error = json.loads(stdout or "").get("Error")
    except (ValueError, AttributeError):
        error = None
    if error:
        return str(error)[:300]
    lines = [
        line.strip()
        for line in log_path.read_text(errors="replace").splitlines()
        if line.strip() and not line.startswith("$ ")
    ]
    return lines[-1][:300] if lines else "(no output)"
