"""The pure core: the model, the rules (frozen rule types), classification (activity), policy and
the keep-running limits (keep). No I/O, no clock reads (``now`` is an argument), no pydantic, YAML
or configuration module (tests/unit/test_boundaries.py)."""
