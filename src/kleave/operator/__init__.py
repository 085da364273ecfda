"""The kleave operator: kopf handlers, one module per kind, plus the runtime that hosts them.

Handler modules expose pure decision functions (tested without a cluster) and a
``register_handlers(registry)`` function; nothing registers with kopf at import time, so
importing a module for its logic never changes which handlers an operator runs.
"""
