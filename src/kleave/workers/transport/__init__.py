"""The workers' data plane transport: framing, KV-cache transfer, attention-FFN exchange, EP.

Everything here moves tensors between processes over plain TCP (asyncio streams, or a
blocking socket on a writer thread where the caller's compute must overlap the wire) or
``torch.distributed`` (expert parallelism), so the CPU path runs the same protocol the GPU
deployment does. See ``docs/workers-transport.md``.
"""
