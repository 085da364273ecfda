"""The wrapper-module recipe for building Kubernetes from Go modules."""

from __future__ import annotations

import pytest

from kleave.devcluster.build import (
    check_go_toolchain,
    parse_go_version,
    staging_replaces,
    version_ldflags,
)
from kleave.devcluster.errors import ToolchainMissingError
from kleave.devcluster.versions import staging_version

KUBERNETES_GOMOD = """module k8s.io/kubernetes

go 1.24.0

require (
	github.com/spf13/cobra v1.9.1
	k8s.io/api v0.0.0
	k8s.io/apiserver v0.0.0
	k8s.io/client-go v0.0.0
	k8s.io/klog/v2 v2.130.1
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
)
"""


def test_staging_replaces_covers_only_v0_0_0_modules() -> None:
    assert staging_replaces(KUBERNETES_GOMOD, "1.34.10") == [
        "replace k8s.io/api => k8s.io/api v0.34.10",
        "replace k8s.io/apiserver => k8s.io/apiserver v0.34.10",
        "replace k8s.io/client-go => k8s.io/client-go v0.34.10",
    ]


def test_staging_replaces_rejects_a_gomod_without_staging_modules() -> None:
    with pytest.raises(ValueError, match="no staging modules"):
        staging_replaces("module x\n\nrequire k8s.io/klog/v2 v2.130.1\n")


def test_version_ldflags_stamp_both_version_packages() -> None:
    flags = version_ldflags("1.34.10")
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {package}.gitVersion=v1.34.10" in flags
        assert f"-X {package}.gitMinor=34" in flags
        assert f"-X {package}.gitMajor=1" in flags


def test_staging_version() -> None:
    assert staging_version("1.35.2") == "v0.35.2"
    with pytest.raises(ValueError):
        staging_version("2.0.0")


def test_parse_go_version() -> None:
    assert parse_go_version("go version go1.26.8 linux/amd64") == (1, 26)
    assert parse_go_version("go version go1.9 linux/amd64") == (1, 9)
    with pytest.raises(ValueError):
        parse_go_version("command not found")


def test_missing_go_gives_an_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolchainMissingError, match=r"install Go 1\.26\+"):
        check_go_toolchain()
