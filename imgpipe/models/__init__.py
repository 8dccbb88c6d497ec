"""Model types, one module each: `<name>.py` defines MODEL_TYPE (see imgpipe/registry.py)."""
