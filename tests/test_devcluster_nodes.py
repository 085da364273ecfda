"""Fake GPU node manifests."""

from __future__ import annotations

import pytest

from kleave.devcluster.nodes import (
    DEFAULT_NODE_GROUPS,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    KWOK_ANNOTATION,
    NodeGroup,
    node_manifests,
    node_names,
    parse_node_groups,
)


def test_default_groups_are_four_h100_four_h20_two_cpu() -> None:
    groups = parse_node_groups(DEFAULT_NODE_GROUPS)
    assert [(g.count, g.gpu_product, g.gpus_per_node) for g in groups] == [
        (4, "H100-SXM", 8),
        (4, "H20", 8),
        (2, None, 0),
    ]
    assert len(node_names(groups)) == 10


def test_gpus_per_node_defaults_to_eight() -> None:
    assert parse_node_groups("1xL40S") == [NodeGroup(count=1, gpu_product="L40S", gpus_per_node=8)]


@pytest.mark.parametrize("text", ["", "4H100", "4xH100:x", "2xcpu:4", "4xH100:0", "-1xH20"])
def test_bad_groups_are_rejected_with_the_offending_item(text: str) -> None:
    with pytest.raises(ValueError):
        parse_node_groups(text)


def test_gpu_node_carries_label_capacity_kwok_annotation_and_gpu_taint() -> None:
    [node] = node_manifests([NodeGroup(count=1, gpu_product="H20", gpus_per_node=4)])
    assert node["metadata"]["name"] == "kwok-h20-0"
    assert node["metadata"]["labels"][GPU_PRODUCT_LABEL] == "H20"
    assert node["metadata"]["labels"]["nvidia.com/gpu.memory"] == "97871"
    assert node["metadata"]["annotations"][KWOK_ANNOTATION] == "fake"
    assert node["spec"]["taints"] == [
        {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
    ]
    assert node["status"]["allocatable"][GPU_RESOURCE] == "4"
    assert node["status"]["capacity"][GPU_RESOURCE] == "4"


def test_cpu_node_has_no_gpu_resource_or_label() -> None:
    [node] = node_manifests(parse_node_groups("1xcpu"))
    assert GPU_RESOURCE not in node["status"]["allocatable"]
    assert GPU_PRODUCT_LABEL not in node["metadata"]["labels"]
    assert node["spec"]["taints"] == []
