"""Where the MLflow store is, whether it answers, and a client for it: what every other tracking
module starts from.

Tracking URI: MLFLOW_TRACKING_URI if set, else the embedded default `sqlite:///<root>/mlflow.db`
with artifacts in `<root>/mlartifacts` (git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmline.config import Params
from lmline.errors import LmlineError

PROBE_TIMEOUT_S = 5.0  # how long a tracking server gets to answer /health before a run gives up on it


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def check_server(uri: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail in one line, within `timeout_s`, when the tracking server does not answer. MLflow's own
    client retries a dead server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, with
    back-off; MLFLOW_HTTP_REQUEST_TIMEOUT, default 120 s per request): those still apply should it
    go away after this check. A file or sqlite store needs no check."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    reason = health_error(uri, timeout_s)
    if reason:
        raise LmlineError(
            f"the MLflow tracking server at {uri} does not answer ({reason}); "
            "start it or point MLFLOW_TRACKING_URI elsewhere"
        )


def health_error(base_url: str, timeout_s: float) -> str:
    """Why the server at `base_url` does not answer its /health within `timeout_s`, or '' if it does
    (MLflow's and Prefect's servers both have one)."""
    import urllib.request

    try:
        urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=timeout_s).close()
    except OSError as exc:  # refused, unresolvable, timed out, or an HTTP error status
        return str(getattr(exc, "reason", None) or exc)
    return ""


def setup(params: Params, root: Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns the experiment id."""
    import mlflow

    root = (root or Path.cwd()).resolve()
    check_server(tracking_uri(root))
    mlflow.set_tracking_uri(tracking_uri(root))
    name = params.project.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        # Only the embedded (sqlite) default needs an explicit artifact root; a server knows its own.
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (root / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent stage
            pass
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise LookupError(f"MLflow experiment {name!r} could not be created at {tracking_uri(root)}")
    # also on the creating call: else the first run of a fresh store lands in the Default experiment
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def client():
    """An MlflowClient on the store `tracking_uri()` names."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.tracking.MlflowClient()
