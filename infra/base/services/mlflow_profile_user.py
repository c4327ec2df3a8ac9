"""One profile's MLflow user, made by MLflow's admin with the official auth client
(``mlflow.server.auth.client.AuthServiceClient``); run by the profile-setup Job (infra/add-profile.sh).

Creates the user (or sets its password, when it exists) from PROFILE_MLFLOW_USERNAME /
PROFILE_MLFLOW_PASSWORD, makes sure the shared experiment METAOPT_EXPERIMENT exists (created by the
admin, so no profile owns it) and gives the user EDIT on it: every profile logs its pipeline runs
there, each as its own user. Everything else follows MLflow's defaults: every user may read
(default_permission READ); a user manages the experiments and registered models it creates.
Idempotent. The admin's credentials come from MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from typing import Mapping

EDIT_OR_MORE = {"EDIT", "MANAGE"}


def wait_for(url: str, attempts: int = 60, pause_s: float = 5.0) -> None:
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5):
                return
        except OSError:
            print(f"waiting for {url} ({attempt}/{attempts})", flush=True)
            time.sleep(pause_s)
    raise SystemExit(f"MLflow at {url} did not answer")


def ensure_user(auth, username: str, password: str) -> str:
    from mlflow.exceptions import RestException

    try:
        auth.create_user(username, password)
        return "created"
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    auth.update_user_password(username, password)
    return "exists; password set from the Secret"


def ensure_edit(auth, username: str, experiment_id: str) -> None:
    from mlflow.exceptions import RestException

    try:
        auth.grant_user_permission(username, "experiment", experiment_id, "EDIT")
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if auth.get_user_permission(username, "experiment", experiment_id).permission not in EDIT_OR_MORE:
            auth.revoke_user_permission(username, "experiment", experiment_id)
            auth.grant_user_permission(username, "experiment", experiment_id, "EDIT")


def main(env: Mapping[str, str] = os.environ) -> int:
    url = env["MLFLOW_URL"]
    username, password = env["PROFILE_MLFLOW_USERNAME"], env["PROFILE_MLFLOW_PASSWORD"]
    experiment = env.get("METAOPT_EXPERIMENT", "metaopt")
    # the clients below authenticate as the admin (MlflowClient and AuthServiceClient read these)
    os.environ["MLFLOW_TRACKING_USERNAME"] = env["MLFLOW_AUTH_ADMIN_USERNAME"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    wait_for(url)
    auth, client = AuthServiceClient(url), MlflowClient(url)
    print(f"MLflow user {username}: {ensure_user(auth, username, password)}", flush=True)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    ensure_edit(auth, username, experiment_id)
    print(f"MLflow user {username}: EDIT on experiment {experiment} ({experiment_id})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
