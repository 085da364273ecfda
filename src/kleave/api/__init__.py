"""kleave's API types: pydantic models, one module per kind, from which the CRDs are generated.

Import the kind modules (``kleave.api.inference_deployment``, ...) directly; this package
re-exports nothing so that importing it stays cheap.
"""
