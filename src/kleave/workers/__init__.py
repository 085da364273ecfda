"""The data plane: a compact MoE decoder, its paged KV cache and its kernels.

Prefill and decode workers (and, in PDAF, attention and FFN workers) all run the same
`model.MoEDecoder`; it is split into per-layer pieces (`attention_prefill`, `attention_decode`,
`ffn`) so that a worker can run only its part and exchange activations or KV with the others.
Only `config` is importable without torch, so a serving plan can name a model on a machine
that never runs one.
"""
