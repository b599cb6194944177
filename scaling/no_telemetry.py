"""MLflow's and Ray's usage reports off unless the user turns them on; imported before either library.

MLflow starts a thread at import that fetches its telemetry config and posts events; Ray's head posts usage stats.
A study's machines often have no internet (the calls then fail in the background), and what a study runs is its
owner's to share: each is off where its variable is unset (MLFLOW_DISABLE_TELEMETRY=false or RAY_USAGE_STATS_ENABLED=1
turns it on).
"""
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
