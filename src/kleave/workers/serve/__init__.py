"""The data plane's servers: prefill, decode/attention, FFN and colocated workers, the router."""
