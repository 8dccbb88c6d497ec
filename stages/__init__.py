"""DVC stages: one module per stage in dvc.yaml, each a thin main() around imgpipe's core."""
