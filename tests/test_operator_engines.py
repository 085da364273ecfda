"""Engine presets: the argv, env and ports each engine runs per topology and role.

The expected command lines are written out by hand from the engines' documented setups (see the
module docstring of kleave.operator.engines), so a change to a preset shows up as a diff here.
"""

from __future__ import annotations

import json
from typing import get_args

import pytest

from kleave import __version__
from kleave.api import inference_deployment
from kleave.api.vocabulary import Engine, KvBackend, Role, Topology
from kleave.operator import engines
from kleave.operator.engines import (
    ContainerPreset,
    EngineConfigError,
    Port,
    RouterSpec,
    WorkerSpec,
    default_image,
    metrics_port,
    resolve_kv_backend,
    router_preset,
    worker_preset,
)

MODEL = "Qwen/Qwen3-30B-A3B"
PLAN = "/etc/kleave/plan/plan.json"
PREFILL_URL = "http://llama-prefill-ab12cd3.default.svc:8000"
DECODE_URL = "http://llama-decode-ab12cd3.default.svc:8000"
ROUTER_HOST = "llama-router.default.svc"
VLLM = ("vllm", "serve")
SGLANG = ("python3", "-m", "sglang.launch_server")
ROUTER_LISTEN = (
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--prometheus-host",
    "0.0.0.0",
    "--prometheus-port",
    "29000",
)
HTTP = Port("http", 8000)


def worker(
    engine: Engine,
    topology: Topology,
    role: Role,
    kv: KvBackend = "auto",
    *,
    tensor: int = 1,
    expert: int = 1,
    gpus: int = 1,
    extra_args: tuple[str, ...] = (),
    image: str | None = None,
    router_host: str | None = None,
) -> ContainerPreset:
    return worker_preset(
        WorkerSpec(
            engine=engine,
            topology=topology,
            role=role,
            model=MODEL,
            tensor=tensor,
            expert=expert,
            gpus=gpus,
            kv_backend=kv,
            extra_args=extra_args,
            image=image,
            router_host=router_host,
        )
    )


def router(
    engine: Engine,
    topology: Topology,
    kv: KvBackend = "auto",
    *,
    prefill: tuple[str, ...] = (PREFILL_URL,),
    decode: tuple[str, ...] = (DECODE_URL,),
    extra_args: tuple[str, ...] = (),
    image: str | None = None,
) -> ContainerPreset:
    return router_preset(
        RouterSpec(
            engine=engine,
            topology=topology,
            model=MODEL,
            kv_backend=kv,
            prefill_urls=prefill if topology != "Colocated" else (),
            decode_urls=decode,
            extra_args=extra_args,
            image=image,
        )
    )


def kv_config(preset: ContainerPreset) -> dict[str, object]:
    """The parsed --kv-transfer-config of a vLLM worker."""
    args = list(preset.args)
    loaded: dict[str, object] = json.loads(args[args.index("--kv-transfer-config") + 1])
    return loaded


# --- supported combinations and kv backend resolution ---------------------------------------


def test_supported_backends_match_the_api_validation() -> None:
    """The CRD's CEL rule and the presets must accept the same backends per engine."""
    assert dict(engines.SUPPORTED_KV_BACKENDS) == inference_deployment._KV_BACKENDS


def test_only_builtin_disaggregates_attention_and_ffn() -> None:
    assert engines.SUPPORTED_TOPOLOGIES == {
        "builtin": ("Colocated", "PD", "PDAF"),
        "vllm": ("Colocated", "PD"),
        "sglang": ("Colocated", "PD"),
    }


def test_every_engine_and_topology_literal_is_covered() -> None:
    assert set(engines.SUPPORTED_KV_BACKENDS) == set(get_args(Engine))
    assert set(engines.TOPOLOGY_ROLES) == set(get_args(Topology))
    for engine, default in engines.DEFAULT_KV_BACKENDS.items():
        assert default in engines.SUPPORTED_KV_BACKENDS[engine]


@pytest.mark.parametrize(
    ("engine", "expected"), [("builtin", "nccl"), ("vllm", "nixl"), ("sglang", "mooncake")]
)
def test_auto_resolves_to_the_engine_default(engine: Engine, expected: KvBackend) -> None:
    assert resolve_kv_backend(engine, "auto") == expected


@pytest.mark.parametrize(
    ("engine", "backend"),
    [("builtin", "tcp"), ("vllm", "nccl"), ("vllm", "mooncake"), ("sglang", "nixl")],
)
def test_an_explicit_supported_backend_is_kept(engine: Engine, backend: KvBackend) -> None:
    assert resolve_kv_backend(engine, backend) == backend


@pytest.mark.parametrize(
    ("engine", "backend", "allowed"),
    [
        ("builtin", "nixl", "tcp, nccl"),
        ("builtin", "mooncake", "tcp, nccl"),
        ("vllm", "tcp", "nixl, nccl, mooncake"),
        ("sglang", "nccl", "mooncake, nixl"),
        ("sglang", "tcp", "mooncake, nixl"),
    ],
)
def test_an_unsupported_backend_names_the_field_and_the_choices(
    engine: Engine, backend: KvBackend, allowed: str
) -> None:
    with pytest.raises(EngineConfigError) as caught:
        resolve_kv_backend(engine, backend)
    assert str(caught.value) == (
        f"spec.kvTransfer.backend {backend!r} is not supported by spec.engine {engine}: "
        f"use auto or one of {allowed}"
    )
    assert isinstance(caught.value, ValueError)


def test_worker_and_router_presets_reject_an_unsupported_backend() -> None:
    with pytest.raises(EngineConfigError, match=r"spec\.kvTransfer\.backend 'nccl'"):
        worker("sglang", "PD", "prefill", "nccl")
    with pytest.raises(EngineConfigError, match=r"spec\.kvTransfer\.backend 'tcp'"):
        router("vllm", "PD", "tcp")


# --- images --------------------------------------------------------------------------------


def test_default_images_are_pinned_short_names() -> None:
    assert default_image("builtin", "worker") == f"kleave/kleave:{__version__}"
    assert default_image("builtin", "router") == f"kleave/kleave:{__version__}"
    assert default_image("vllm", "worker") == "vllm/vllm-openai:v0.31.0"
    assert default_image("vllm", "router") == "vllm/vllm-router:v0.1.17"
    assert default_image("sglang", "worker") == "lmsysorg/sglang:v0.5.21"
    assert default_image("sglang", "router") == "lmsysorg/sglang:v0.5.21"


@pytest.mark.parametrize("engine", get_args(Engine))
@pytest.mark.parametrize("component", ["worker", "router"])
def test_no_default_image_names_a_registry_or_floats(engine: Engine, component: str) -> None:
    image = default_image(engine, component)  # type: ignore[arg-type]
    name, _, tag = image.rpartition(":")
    first = name.split("/")[0]
    assert "." not in first and ":" not in first and first != "localhost"  # no registry host
    assert tag and tag != "latest"


def test_default_image_rejects_an_unknown_component() -> None:
    with pytest.raises(ValueError, match="worker or router"):
        default_image("vllm", "proxy")  # type: ignore[arg-type]


def test_an_image_override_wins_for_workers_and_routers() -> None:
    assert worker("vllm", "PD", "decode", image="mirror/vllm:patched").image == (
        "mirror/vllm:patched"
    )
    assert router("sglang", "PD", image="mirror/sglang-router:1").image == "mirror/sglang-router:1"
    assert worker("builtin", "PDAF", "ffn", image="kleave/kleave:dev").image == "kleave/kleave:dev"


# --- builtin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topology", "role"),
    [
        ("Colocated", "decode"),
        ("PD", "prefill"),
        ("PD", "decode"),
        ("PDAF", "prefill"),
        ("PDAF", "attention"),
        ("PDAF", "ffn"),
    ],
)
def test_builtin_worker(topology: Topology, role: Role) -> None:
    # FFN workers split by experts, the others by tensor parallelism, over all their GPUs.
    tensor, expert = (1, 4) if role == "ffn" else (4, 1)
    preset = worker("builtin", topology, role, "tcp", tensor=tensor, expert=expert, gpus=4)
    assert preset == ContainerPreset(
        image=f"kleave/kleave:{__version__}",
        command=("kleave",),
        args=(
            "workers",
            "serve",
            "--role",
            role,
            "--plan",
            PLAN,
            "--port",
            "8000",
            "--kv-backend",
            "tcp",
            "--tensor-parallel",
            str(tensor),
            "--expert-parallel",
            str(expert),
            "--device",
            "cuda",
        ),
        env=(),
        ports=(HTTP,),
        readiness_path="/readyz",
        liveness_path="/healthz",
        metrics_path="/metrics",
        shm=True,
    )


@pytest.mark.parametrize(
    ("role", "tensor", "expert", "gpus", "message"),
    [
        ("decode", 1, 2, 2, r"spec.pools.decode.parallelism.expert \(2\): .* only in PDAF's ffn"),
        ("ffn", 2, 2, 4, r"spec.pools.ffn.parallelism: .* not both"),
        ("decode", 2, 1, 4, r"spec.pools.decode.gpusPerReplica \(4\) must equal .* \(2\)"),
    ],
)
def test_builtin_refuses_a_layout_its_workers_cannot_run(
    role: Role, tensor: int, expert: int, gpus: int, message: str
) -> None:
    topology: Topology = "PDAF" if role == "ffn" else "PD"
    with pytest.raises(EngineConfigError, match=message):
        worker("builtin", topology, role, "tcp", tensor=tensor, expert=expert, gpus=gpus)


def test_builtin_worker_resolves_auto_and_needs_no_shm_on_one_gpu() -> None:
    preset = worker("builtin", "PD", "decode")
    assert preset.args[preset.args.index("--kv-backend") + 1] == "nccl"
    assert not preset.shm


@pytest.mark.parametrize("topology", get_args(Topology))
def test_builtin_router_reads_the_plan(topology: Topology) -> None:
    decode = ("http://llama-attention-ab12cd3.default.svc:8000",)
    preset = router("builtin", topology, decode=decode, extra_args=("--log-level", "debug"))
    assert preset == ContainerPreset(
        image=f"kleave/kleave:{__version__}",
        command=("kleave",),
        args=("workers", "router", "--plan", PLAN, "--port", "8000", "--log-level", "debug"),
        env=(),
        ports=(HTTP,),
        readiness_path="/readyz",
        liveness_path="/healthz",
        metrics_path="/metrics",
        shm=False,
    )


# --- vLLM workers --------------------------------------------------------------------------


def test_vllm_colocated_is_a_plain_server() -> None:
    preset = worker("vllm", "Colocated", "decode", tensor=2, gpus=2)
    assert preset == ContainerPreset(
        image="vllm/vllm-openai:v0.31.0",
        command=VLLM,
        args=(MODEL, "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "2"),
        env=(),
        ports=(HTTP,),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        shm=True,
    )


@pytest.mark.parametrize(
    ("role", "kv_role"), [("prefill", "kv_producer"), ("decode", "kv_consumer")]
)
def test_vllm_pd_nixl(role: Role, kv_role: str) -> None:
    preset = worker("vllm", "PD", role, "auto")
    assert preset.command == VLLM
    assert preset.args == (
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "1",
        "--kv-transfer-config",
        f'{{"kv_connector":"NixlConnector","kv_role":"{kv_role}"}}',
    )
    assert preset.env == (
        ("VLLM_NIXL_SIDE_CHANNEL_HOST", "$(POD_IP)"),
        ("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"),
    )
    assert preset.ports == (HTTP, Port("nixl", 5600))
    assert not preset.shm


def test_vllm_pd_mooncake_prefill_serves_the_bootstrap_port() -> None:
    preset = worker("vllm", "PD", "prefill", "mooncake")
    assert preset.args[-2:] == (
        "--kv-transfer-config",
        '{"kv_connector":"MooncakeConnector","kv_role":"kv_producer"}',
    )
    assert preset.env == (("VLLM_MOONCAKE_BOOTSTRAP_PORT", "8998"),)
    assert preset.ports == (HTTP, Port("bootstrap", 8998))


def test_vllm_pd_mooncake_decode() -> None:
    preset = worker("vllm", "PD", "decode", "mooncake")
    assert preset.args[-2:] == (
        "--kv-transfer-config",
        '{"kv_connector":"MooncakeConnector","kv_role":"kv_consumer"}',
    )
    assert preset.env == ()
    assert preset.ports == (HTTP,)


@pytest.mark.parametrize(
    ("role", "kv_role", "buffer"),
    [("prefill", "kv_producer", "1e1"), ("decode", "kv_consumer", "8e9")],
)
def test_vllm_pd_p2p_nccl_registers_with_the_router(role: Role, kv_role: str, buffer: str) -> None:
    preset = worker("vllm", "PD", role, "nccl", router_host=ROUTER_HOST)
    assert kv_config(preset) == {
        "kv_connector": "P2pNcclConnector",
        "kv_role": kv_role,
        "kv_buffer_size": buffer,
        "kv_port": "21001",
        "kv_connector_extra_config": {
            "proxy_ip": ROUTER_HOST,
            "proxy_port": "30001",
            "http_port": "8000",
            "send_type": "PUT_ASYNC",
        },
    }
    assert preset.env == (("VLLM_HOST_IP", "$(POD_IP)"),)
    assert preset.ports == (HTTP, Port("kv-nccl", 21001))


def test_vllm_p2p_nccl_without_a_router_address_is_an_error() -> None:
    with pytest.raises(EngineConfigError) as caught:
        worker("vllm", "PD", "decode", "nccl")
    assert str(caught.value) == (
        "spec.kvTransfer.backend nccl with spec.engine vllm needs the router's address "
        "(P2pNcclConnector workers register with it), and none was given"
    )


def test_vllm_expert_parallel_runs_data_parallel_attention() -> None:
    """tensor 2 x expert 4 on 8 GPUs: TP 2, DP 4, and vLLM's EP group spans TP x DP = 8."""
    preset = worker("vllm", "PD", "decode", "nixl", tensor=2, expert=4, gpus=8)
    assert preset.args[:10] == (
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "2",
        "--data-parallel-size",
        "4",
        "--enable-expert-parallel",
    )
    assert preset.shm


def test_vllm_dense_fills_spare_gpus_with_data_parallel_ranks() -> None:
    preset = worker("vllm", "Colocated", "decode", tensor=2, gpus=4)
    assert preset.args == (
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tensor-parallel-size",
        "2",
        "--data-parallel-size",
        "2",
    )


# --- SGLang workers ------------------------------------------------------------------------


def test_sglang_colocated_is_a_plain_server() -> None:
    preset = worker("sglang", "Colocated", "decode")
    assert preset == ContainerPreset(
        image="lmsysorg/sglang:v0.5.21",
        command=SGLANG,
        args=(
            "--model-path",
            MODEL,
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--tp-size",
            "1",
            "--enable-metrics",
        ),
        env=(),
        ports=(HTTP,),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        shm=False,
    )


@pytest.mark.parametrize("kv", ["mooncake", "nixl"])
def test_sglang_pd_prefill(kv: KvBackend) -> None:
    preset = worker("sglang", "PD", "prefill", kv, tensor=4, gpus=4)
    assert preset.args == (
        "--model-path",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tp-size",
        "4",
        "--enable-metrics",
        "--disaggregation-mode",
        "prefill",
        "--disaggregation-transfer-backend",
        kv,
        "--disaggregation-bootstrap-port",
        "8998",
    )
    assert preset.env == ()
    assert preset.ports == (HTTP, Port("bootstrap", 8998))
    assert preset.shm


@pytest.mark.parametrize("kv", ["mooncake", "nixl"])
def test_sglang_pd_decode(kv: KvBackend) -> None:
    preset = worker("sglang", "PD", "decode", kv)
    assert preset.args == (
        "--model-path",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tp-size",
        "1",
        "--enable-metrics",
        "--disaggregation-mode",
        "decode",
        "--disaggregation-transfer-backend",
        kv,
    )
    assert preset.ports == (HTTP,)


def test_sglang_pd_defaults_to_mooncake() -> None:
    preset = worker("sglang", "PD", "decode")
    assert preset.args[-2:] == ("--disaggregation-transfer-backend", "mooncake")


def test_sglang_expert_parallel_uses_dp_attention_over_all_gpus() -> None:
    """tensor 2 x expert 4 on 8 GPUs: TP = EP = 8, attention DP 4 (so attention TP 2)."""
    preset = worker("sglang", "Colocated", "decode", tensor=2, expert=4, gpus=8)
    assert preset.args == (
        "--model-path",
        MODEL,
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--tp-size",
        "8",
        "--dp-size",
        "4",
        "--enable-dp-attention",
        "--ep-size",
        "8",
        "--enable-metrics",
    )


def test_sglang_dense_fills_spare_gpus_with_data_parallel_replicas() -> None:
    preset = worker("sglang", "Colocated", "decode", tensor=2, gpus=8)
    assert preset.args[6:11] == ("--tp-size", "2", "--dp-size", "4", "--enable-metrics")


# --- user args -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "topology", "role"),
    [
        ("builtin", "PDAF", "attention"),
        ("vllm", "PD", "prefill"),
        ("vllm", "Colocated", "decode"),
        ("sglang", "PD", "decode"),
    ],
)
def test_user_args_come_last_so_they_win(engine: Engine, topology: Topology, role: Role) -> None:
    extra = ("--max-model-len", "8192", "--tensor-parallel-size", "4")
    plain = worker(engine, topology, role)
    preset = worker(engine, topology, role, extra_args=extra)
    assert preset.args == (*plain.args, *extra)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_user_router_args_come_last(engine: Engine) -> None:
    plain = router(engine, "PD")
    preset = router(engine, "PD", extra_args=("--policy", "round_robin"))
    assert preset.args == (*plain.args, "--policy", "round_robin")


# --- routers -------------------------------------------------------------------------------


def test_vllm_router_pd_nixl() -> None:
    preset = router("vllm", "PD", prefill=(PREFILL_URL, "http://p2:8000"))
    assert preset == ContainerPreset(
        image="vllm/vllm-router:v0.1.17",
        command=("vllm-router",),
        args=(
            "--vllm-pd-disaggregation",
            "--prefill",
            PREFILL_URL,
            "--prefill",
            "http://p2:8000",
            "--decode",
            DECODE_URL,
            *ROUTER_LISTEN,
        ),
        env=(),
        ports=(HTTP, Port("metrics", 29000)),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        shm=False,
    )
    assert metrics_port(preset) == Port("metrics", 29000)


def test_vllm_router_pd_mooncake_passes_the_bootstrap_port() -> None:
    preset = router("vllm", "PD", "mooncake")
    assert preset.args == (
        "--vllm-pd-disaggregation",
        "--kv-connector",
        "mooncake",
        "--prefill",
        PREFILL_URL,
        "8998",
        "--decode",
        DECODE_URL,
        *ROUTER_LISTEN,
    )


def test_vllm_router_pd_nccl_discovers_registering_workers() -> None:
    preset = router("vllm", "PD", "nccl", prefill=(), decode=())
    assert preset.args == (
        "--vllm-pd-disaggregation",
        "--vllm-discovery-address",
        "0.0.0.0:30001",
        *ROUTER_LISTEN,
    )
    assert preset.ports == (HTTP, Port("metrics", 29000), Port("discovery", 30001))


def test_vllm_router_colocated() -> None:
    preset = router("vllm", "Colocated")
    assert preset.args == ("--worker-urls", DECODE_URL, *ROUTER_LISTEN)


@pytest.mark.parametrize("kv", ["mooncake", "nixl"])
def test_sglang_router_pd(kv: KvBackend) -> None:
    preset = router("sglang", "PD", kv, decode=(DECODE_URL, "http://d2:8000"))
    assert preset == ContainerPreset(
        image="lmsysorg/sglang:v0.5.21",
        command=("python3", "-m", "sglang_router.launch_router"),
        args=(
            "--pd-disaggregation",
            "--prefill",
            PREFILL_URL,
            "8998",
            "--decode",
            DECODE_URL,
            "--decode",
            "http://d2:8000",
            *ROUTER_LISTEN,
        ),
        env=(),
        ports=(HTTP, Port("metrics", 29000)),
        readiness_path="/health",
        liveness_path="/health",
        metrics_path="/metrics",
        shm=False,
    )


def test_sglang_router_colocated() -> None:
    preset = router("sglang", "Colocated")
    assert preset.args == ("--worker-urls", DECODE_URL, *ROUTER_LISTEN)


def test_builtin_presets_scrape_metrics_on_http() -> None:
    assert metrics_port(router("builtin", "PD")) == HTTP
    assert metrics_port(worker("vllm", "PD", "prefill")) == HTTP


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_pdaf_needs_builtin(engine: Engine) -> None:
    message = (
        f"spec.topology PDAF needs spec.engine builtin: only kleave's workers disaggregate "
        f"attention and FFN; with spec.engine {engine} use one of Colocated, PD"
    )
    with pytest.raises(EngineConfigError) as caught:
        worker(engine, "PDAF", "attention")
    assert str(caught.value) == message
    with pytest.raises(EngineConfigError) as caught:
        router(engine, "PDAF")
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("topology", "role", "pools"),
    [
        ("PD", "attention", "prefill, decode"),
        ("PD", "ffn", "prefill, decode"),
        ("Colocated", "prefill", "decode"),
        ("Colocated", "ffn", "decode"),
        ("PDAF", "decode", "prefill, attention, ffn"),
    ],
)
def test_a_role_outside_the_topology(topology: Topology, role: Role, pools: str) -> None:
    with pytest.raises(EngineConfigError) as caught:
        worker("builtin", topology, role)
    assert str(caught.value) == (
        f"spec.pools.{role} is not part of spec.topology {topology}, which runs the pools {pools}"
    )


def test_an_unknown_engine() -> None:
    with pytest.raises(EngineConfigError) as caught:
        worker("trtllm", "PD", "prefill")  # type: ignore[arg-type]
    assert str(caught.value) == "spec.engine 'trtllm' is unknown: use one of builtin, vllm, sglang"
    with pytest.raises(EngineConfigError, match=r"spec\.engine 'trtllm'"):
        resolve_kv_backend("trtllm", "auto")  # type: ignore[arg-type]
    with pytest.raises(EngineConfigError, match=r"spec\.engine 'trtllm'"):
        default_image("trtllm", "worker")  # type: ignore[arg-type]


def test_an_unknown_topology() -> None:
    with pytest.raises(EngineConfigError) as caught:
        worker("vllm", "Mixed", "decode")  # type: ignore[arg-type]
    assert str(caught.value) == "spec.topology 'Mixed' is unknown: use one of Colocated, PD, PDAF"


@pytest.mark.parametrize("engine", get_args(Engine))
def test_gpus_must_hold_tensor_times_expert(engine: Engine) -> None:
    with pytest.raises(EngineConfigError) as caught:
        worker(engine, "PD", "decode", tensor=2, expert=2, gpus=6)
    assert str(caught.value) == (
        "spec.pools.decode.gpusPerReplica (6) must be a multiple of parallelism.tensor x "
        "parallelism.expert (2 x 2)"
    )


def test_parallelism_must_be_positive() -> None:
    with pytest.raises(EngineConfigError) as caught:
        worker("vllm", "PD", "prefill", tensor=0, gpus=1)
    assert str(caught.value) == (
        "spec.pools.prefill.parallelism.tensor, .parallelism.expert and .gpusPerReplica must be "
        "at least 1 (got 0, 1, 1)"
    )


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_pd_router_needs_both_pools(engine: Engine) -> None:
    with pytest.raises(EngineConfigError) as caught:
        router(engine, "PD", prefill=())
    assert str(caught.value) == (
        "spec.topology PD needs the prefill and the decode pool's URLs for the router "
        f"(got prefill [], decode [{DECODE_URL!r}])"
    )


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_colocated_router_needs_the_decode_pool_only(engine: Engine) -> None:
    with pytest.raises(EngineConfigError, match="routes to the decode pool only"):
        router(engine, "Colocated", decode=())
    with pytest.raises(EngineConfigError, match="routes to the decode pool only"):
        router_preset(RouterSpec(engine, "Colocated", MODEL, "auto", (PREFILL_URL,), (DECODE_URL,)))
