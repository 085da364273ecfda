"""Credentials, kubeconfigs, process handling and state-dir safety: no cluster needed."""

from __future__ import annotations

import base64
import socket
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from kleave.devcluster import kubeconfig, pki, processes
from kleave.devcluster.cluster import MARKER_FILE, DevCluster
from kleave.devcluster.errors import DevClusterError, PortInUseError, StaleStateError


def test_pki_serving_cert_is_signed_by_ca_and_names_loopback(tmp_path: Path) -> None:
    creds = pki.generate(tmp_path)
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    serving = x509.load_pem_x509_certificate(creds.serving_cert.read_bytes())
    serving.verify_directly_issued_by(ca)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    assert creds.token_file.stat().st_mode & 0o077 == 0


def test_each_client_has_its_own_token(tmp_path: Path) -> None:
    creds = pki.generate(tmp_path)
    tokens = {client: creds.token(client) for client in pki.CLIENT_IDENTITIES}
    assert len(set(tokens.values())) == len(tokens)
    assert 'kleave-admin,kleave-admin,"system:masters"' in creds.token_file.read_text()


def test_kubeconfig_trusts_the_ca_and_uses_the_token(tmp_path: Path) -> None:
    path = kubeconfig.write(
        tmp_path / "kc", kubeconfig.render("https://127.0.0.1:1", b"PEM", "tok")
    )
    config = yaml.safe_load(path.read_text())
    assert config["current-context"] == kubeconfig.CONTEXT
    assert (
        base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"]) == b"PEM"
    )
    assert config["users"][0]["user"]["token"] == "tok"
    assert path.stat().st_mode & 0o077 == 0


def test_start_find_and_stop_a_process_group(tmp_path: Path) -> None:
    marker = str(tmp_path / "marker-arg")
    pid = processes.start(
        [sys.executable, "-c", "import time; time.sleep(60)", marker], tmp_path / "p.log"
    )
    assert processes.is_alive(pid)
    assert processes.processes_mentioning(marker) == [pid]
    processes.stop([pid])
    assert not processes.is_alive(pid)
    assert processes.processes_mentioning(marker) == []


def test_port_checks() -> None:
    [port] = processes.free_ports(1)
    assert processes.port_is_free(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not processes.port_is_free(port)


def test_up_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} .* in use"):
            DevCluster(state_dir=tmp_path / "c").up(apiserver_port=port)


def test_up_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DevClusterError, match="not a kleave dev-cluster state directory"):
        DevCluster(state_dir=tmp_path).up()
    with pytest.raises(DevClusterError, match="not a kleave dev-cluster state directory"):
        DevCluster(state_dir=tmp_path).down()
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_up_reports_stale_state_of_a_dead_cluster(tmp_path: Path) -> None:
    (tmp_path / MARKER_FILE).write_text("")
    (tmp_path / "state.json").write_text(
        '{"server": "https://127.0.0.1:1", "kubeconfig": "x", "ports": {}, "phase": "Running",'
        ' "components": [{"name": "etcd", "pid": 999999999, "argv": [], "log": "l"}]}'
    )
    with pytest.raises(
        StaleStateError, match=r"etcd not running.*kleave dev-cluster down --state-dir"
    ):
        DevCluster(state_dir=tmp_path).up()
    assert DevCluster(state_dir=tmp_path).down() == 0
    assert not tmp_path.exists()
