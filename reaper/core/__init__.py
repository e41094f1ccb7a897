"""The pure core: the model, classification (activity) and policy. No I/O, no clock reads
(``now`` is an argument), no pydantic, YAML or configuration module."""
