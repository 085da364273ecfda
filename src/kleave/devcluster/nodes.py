"""Fake GPU nodes for kwok: pure builders of Node objects from a compact node-group spec."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

GPU_MEMORY_MIB = {
    "H100-SXM": 81559,
    "H100-PCIe": 81559,
    "H200": 143771,
    "H20": 97871,
    "A100-SXM4-80GB": 81920,
    "L40S": 46068,
}
"""What NVIDIA's GPU feature discovery reports as `nvidia.com/gpu.memory` for known products."""

DEFAULT_NODE_GROUPS = "4xH100-SXM:8,4xH20:8,2xcpu"


@dataclass(frozen=True)
class NodeGroup:
    """`count` identical nodes; `gpu_product` None means a CPU-only node."""

    count: int
    gpu_product: str | None
    gpus_per_node: int = 0
    cpu: str = "192"
    memory: str = "2Ti"

    @property
    def name_prefix(self) -> str:
        return f"kwok-{(self.gpu_product or 'cpu').lower()}"


_GROUP = re.compile(r"^(?P<count>\d+)x(?P<product>[A-Za-z0-9][A-Za-z0-9._-]*)(?::(?P<gpus>\d+))?$")


def parse_node_groups(text: str) -> list[NodeGroup]:
    """Parse `4xH100-SXM:8,4xH20:8,2xcpu` (COUNTxPRODUCT[:GPUS_PER_NODE], `cpu` = no GPU)."""
    groups: list[NodeGroup] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        match = _GROUP.match(item)
        if not match:
            raise ValueError(
                f"bad node group {item!r}: expected COUNTxPRODUCT[:GPUS], "
                "e.g. 4xH100-SXM:8 or 2xcpu"
            )
        count = int(match["count"])
        product = match["product"]
        if product.lower() == "cpu":
            if match["gpus"]:
                raise ValueError(f"bad node group {item!r}: cpu nodes have no GPUs")
            groups.append(NodeGroup(count=count, gpu_product=None, cpu="32", memory="128Gi"))
        else:
            gpus = int(match["gpus"] or 8)
            if gpus < 1:
                raise ValueError(f"bad node group {item!r}: GPUs per node must be >= 1")
            groups.append(NodeGroup(count=count, gpu_product=product, gpus_per_node=gpus))
    if not groups:
        raise ValueError("no node groups given")
    return groups


def node_names(groups: list[NodeGroup]) -> list[str]:
    """Node names in creation order, numbered per group."""
    return [f"{g.name_prefix}-{i}" for g in groups for i in range(g.count)]


def node_manifests(groups: list[NodeGroup]) -> list[dict[str, Any]]:
    """Node objects (with status) that kwok manages and the scheduler can place GPU pods on."""
    manifests = []
    names = iter(node_names(groups))
    for group in groups:
        for _ in range(group.count):
            manifests.append(_node(next(names), group))
    return manifests


def _node(name: str, group: NodeGroup) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    resources = {"cpu": group.cpu, "memory": group.memory, "pods": "110"}
    if group.gpu_product is not None:
        labels |= {
            GPU_PRODUCT_LABEL: group.gpu_product,
            "nvidia.com/gpu.count": str(group.gpus_per_node),
            "nvidia.com/gpu.present": "true",
        }
        if group.gpu_product in GPU_MEMORY_MIB:
            labels["nvidia.com/gpu.memory"] = str(GPU_MEMORY_MIB[group.gpu_product])
        resources[GPU_RESOURCE] = str(group.gpus_per_node)
    # No kwok taint: every node of the dev cluster is fake, so there are no real pods to keep
    # off them. GPU nodes carry the nvidia.com/gpu taint that managed GPU node pools (GKE, AKS)
    # set, so only pods that ask for GPUs (and tolerate it) land there, as in production.
    taints = (
        [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
        if group.gpu_product is not None
        else []
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints},
        "status": {"capacity": dict(resources), "allocatable": dict(resources)},
    }
