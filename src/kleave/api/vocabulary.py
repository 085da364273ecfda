"""The API's closed vocabularies (roles, engines, topologies, KV backends) as plain types.

Apart from the pydantic models so the data plane (``kleave.workers``, which reads them through
``operator.engines``) imports no pydantic: the GPU machine's image has torch but not pydantic.
"""

from __future__ import annotations

from typing import Literal

Role = Literal["prefill", "decode", "attention", "ffn"]
Engine = Literal["builtin", "vllm", "sglang"]
Topology = Literal["Colocated", "PD", "PDAF"]
KvBackend = Literal["auto", "tcp", "nccl", "nixl", "mooncake"]
