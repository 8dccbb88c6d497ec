"""Everything MLflow, in three parts: `connection` (where the store is, the server and login
checks, open_store), `runs` (Store and Run: one run per model, and the provenance it records)
and `pyfunc` (the model as an MLflow pyfunc). Only this package imports mlflow.

Nothing is re-exported here, so that importing the package imports nothing: callers import from
the submodule they use. Nothing happens at import time: the tracking URI is resolved and set
when a stage opens its store.
"""
