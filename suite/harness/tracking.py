"""MLflow records of a study: one experiment per study (MLflow's "Machine learning" type), a run
per invocation with a nested run per condition, and a top-level run per estimator and condition
(named by both, carrying the condition's parameters), so that the UI's filters and charts compare
estimator runs directly. Everything goes through MlflowClient, so several processes can log to
the same store.

Metric keys are namespaced: ``bias/rel``, ``variance/trajectory``, ``test/p_value``,
``exact/variance``, ... (``suite.core.metrics.METRICS`` defines each; docs/metrics.md explains
them).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from ..core.metrics import flatten
from .estimator_stats import EstimatorStats

__all__ = ["EXPERIMENT_KIND", "Tracker", "flatten_stats", "tracking_uri", "ui_link"]

DEFAULT_URI = "sqlite:///mlflow.db"
# The experiment tag MLflow 3 reads as the experiment's type ("Machine learning", not "GenAI apps
# & agents"); the UI's GenAI/Model training switch is a URL parameter (or the user's last choice).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "workflowType=machine_learning"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def ui_link(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the MLflow UI's model-training view."""
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_VIEW}"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device: str) -> dict[str, str]:
    import mlflow
    import optuna
    import torch

    return {"git_commit": _git_commit(), "device": device, "torch_version": torch.__version__,
            "optuna_version": optuna.__version__, "mlflow_version": mlflow.__version__,
            "python_version": platform.python_version(), "host": platform.node()}


def flatten_stats(stats: EstimatorStats) -> dict[str, float]:
    """MLflow metrics of one estimator's statistics (suite.core.metrics.flatten of its row)."""
    return flatten(stats.to_json())


class _Retrying:
    """MlflowClient whose calls retry when a shared SQLite store is briefly locked."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            import time

            for attempt in range(8):
                try:
                    return method(*args, **kwargs)
                except Exception as exc:  # MlflowException wraps sqlalchemy's OperationalError
                    if "locked" not in str(exc) or attempt == 7:
                        raise
                    time.sleep(0.25 * 2**attempt)

        return call


class Tracker:
    """Thin, process-safe wrapper over MlflowClient for one study's experiment."""

    def __init__(self, experiment: str, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = _Retrying(MlflowClient(tracking_uri=self.uri))
        self.experiment_id = self._experiment(experiment)

    def _experiment(self, name: str) -> str:
        """The experiment's id, created (with its kind tag) when missing, by one of several
        racing processes; a store written before the tag existed gets it."""
        key, kind = EXPERIMENT_KIND
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, tags={key: kind})
            except Exception:  # another process created it first (RESOURCE_ALREADY_EXISTS)
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.tags.get(key) != kind:
            self.client.set_experiment_tag(found.experiment_id, key, kind)
        return found.experiment_id

    def start(self, name: str, parent: str | None = None, tags: dict | None = None,
              params: dict | None = None) -> str:
        from mlflow.entities import Param

        tags = dict(tags or {})
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if params:
            self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log(self, run_id: str, metrics: dict[str, float], step: int = 0, tags: dict | None = None) -> None:
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), 1), 900):  # MLflow caps a batch at 1000 entries
            self.client.log_batch(run_id, metrics=ms[i:i + 900], tags=ts if i == 0 else [])

    def log_json(self, run_id: str, obj, name: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=1, sort_keys=True, default=str), name)

    def log_file(self, run_id: str, path: str | Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
