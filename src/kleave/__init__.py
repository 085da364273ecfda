"""kleave: a Kubernetes operator for disaggregated LLM inference and agent sandboxes."""

__version__ = "0.1.0"
