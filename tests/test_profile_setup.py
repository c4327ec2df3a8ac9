"""The identity of a profile, from the scripts that make it: MinIO's setup functions (run by bash
against a stand-in mc that answers as the release in the Jobs' image does, tests/fake_mc.py),
infra/add-profile.sh (against a stand-in kubectl, tests/fake_kubectl.py), and the MLflow side
(the profile user's script and the gateway login, against a live MLflow basic-auth server with
infra's authorization function).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SERVICES = INFRA / "base" / "services"
BASH = shutil.which("bash")
KUBECTL = shutil.which("kubectl")


def _tool(bin_dir: Path, name: str, module: str) -> None:
    """An executable ``bin_dir/name`` that runs tests/<module>.py with this Python."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / module}" "$@"\n')
    path.chmod(0o755)


@pytest.fixture(scope="module")
def services() -> list[dict]:
    if KUBECTL is None or BASH is None:
        pytest.skip("needs kubectl (kustomize) and bash")
    done = subprocess.run([KUBECTL, "kustomize", str(SERVICES)], capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _find(objects: list[dict], kind: str, name: str) -> dict:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


# ----------------------------------------------------------------------------- MinIO


class Minio:
    """The setup Jobs' scripts, run by bash with their ConfigMaps where the Jobs mount them."""

    def __init__(self, objects: list[dict], root: Path):
        self.root, self.state = root, root / "minio.json"
        _tool(root / "bin", "mc", "fake_mc.py")
        for folder, config_map in (("scripts", "minio-setup"), ("policies", "minio-policies")):
            (root / folder).mkdir(parents=True)
            for file, text in _find(objects, "ConfigMap", config_map)["data"].items():
                (root / folder / file).write_text(text)
        self.buckets_job = _find(objects, "Job", "minio-buckets")["spec"]["template"]["spec"]["containers"][0]
        profile = _find(objects, "CronJob", "profile-setup")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        self.profile_job = next(c for c in profile["initContainers"] if c["name"] == "minio-user")

    def run(self, container: dict, **env: str) -> subprocess.CompletedProcess:
        script = container["args"][0].replace("/scripts/", f"{self.root}/scripts/").replace("/policies/", f"{self.root}/policies/")
        assert container["command"] == ["/bin/bash", "-ec"]
        values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        values.update(MINIO_ROOT_USER="root", MINIO_ROOT_PASSWORD="root-password", HOME=str(self.root), MC_CONFIG_DIR=str(self.root / ".mc"))
        values.update(env, PATH=f"{self.root / 'bin'}:{os.environ['PATH']}", FAKE_MINIO_STATE=str(self.state))
        return subprocess.run([BASH, "-ec", script], env=values, capture_output=True, text=True, timeout=60)

    def read(self) -> dict:
        return json.loads(self.state.read_text())


def test_the_policy_is_attached_to_a_user_named_like_it(services: list[dict], tmp_path: Path) -> None:
    minio = Minio(services, tmp_path)
    done = minio.run(minio.buckets_job, MLFLOW_ACCESS_KEY="metaopt-mlflow", MLFLOW_SECRET_KEY="mlflow-secret-1")
    assert done.returncode == 0, done.stderr
    state = minio.read()
    assert set(state["buckets"]) == {"mlflow-artifacts", "metaopt"} and set(state["policies"]) == {"metaopt-pipelines", "metaopt-mlflow"}
    assert state["users"]["metaopt-mlflow"]["policies"] == ["metaopt-mlflow"]  # MLflow's user, named like its policy
    # a profile whose user is named exactly like the policy: the old check (`mc admin user info |
    # grep -q <policy>`) matched the "AccessKey: <user>" line and never attached it
    for secret in ("profile-secret-1", "profile-secret-2"):  # the second run re-keys and finds the policy attached
        done = minio.run(minio.profile_job, PROFILE_S3_ACCESS_KEY="metaopt-pipelines", PROFILE_S3_SECRET_KEY=secret)
        assert done.returncode == 0, done.stderr
        assert "MinIO user metaopt-pipelines: policy metaopt-pipelines attached" in done.stdout
        user = minio.read()["users"]["metaopt-pipelines"]
        assert user == {"policies": ["metaopt-pipelines"], "status": "enabled", "secret": secret}
    # no output is parsed: the scripts never ask mc for a user's info
    assert not [call for call in minio.read()["calls"] if call[:3] == ["admin", "user", "info"]]
    # why the old check could not work: that mc's info of a user without policy names the user
    fresh = Minio(services, tmp_path / "fresh")
    fresh.run(fresh.buckets_job, MLFLOW_ACCESS_KEY="metaopt-mlflow", MLFLOW_SECRET_KEY="mlflow-secret-1")
    subprocess.run([str(fresh.root / "bin" / "mc"), "admin", "user", "add", "root", "metaopt-pipelines", "x" * 8], env={**os.environ, "FAKE_MINIO_STATE": str(fresh.state)}, check=True, capture_output=True)  # fmt: skip
    info = subprocess.run([str(fresh.root / "bin" / "mc"), "admin", "user", "info", "root", "metaopt-pipelines"], env={**os.environ, "FAKE_MINIO_STATE": str(fresh.state)}, capture_output=True, text=True).stdout  # fmt: skip
    assert info.splitlines()[0] == "AccessKey: metaopt-pipelines" and "PolicyName: \n" in info


def test_a_missing_policy_fails_the_job(services: list[dict], tmp_path: Path) -> None:
    minio = Minio(services, tmp_path)  # the buckets Job never ran: no policy metaopt-pipelines yet
    done = minio.run(minio.profile_job, PROFILE_S3_ACCESS_KEY="metaopt-team-a", PROFILE_S3_SECRET_KEY="secret-12345")
    assert done.returncode != 0 and "Unable to make user/group policy association" in done.stderr


# ----------------------------------------------------------------------------- add-profile.sh


class Kube:
    def __init__(self, root: Path, **extra: Any):
        self.root, self.state = root, root / "kube.json"
        _tool(root / "bin", "kubectl", "fake_kubectl.py")
        state = {"namespaces": {"team-a": {}, "metaopt": {}}, "secrets": {}, "configmaps": {}, "jobs": [], "applied": [], "calls": []}
        state.update(extra)
        self.state.write_text(json.dumps(state))

    def add_profile(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        values = {**os.environ, "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}", "FAKE_KUBE_STATE": str(self.state), "REAL_KUBECTL": KUBECTL, **env}
        return subprocess.run([BASH, str(INFRA / "add-profile.sh"), *args], env=values, capture_output=True, text=True, timeout=120)

    def read(self) -> dict:
        return json.loads(self.state.read_text())

    def secret(self, namespace: str, name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in self.read()["secrets"][namespace][name].items()}


@pytest.fixture()
def kube(tmp_path: Path) -> Kube:
    if KUBECTL is None or BASH is None or shutil.which("openssl") is None:
        pytest.skip("needs kubectl (kustomize), bash and openssl")
    return Kube(tmp_path)


def test_add_profile_gives_a_profile_its_own_identity_in_one_command(kube: Kube) -> None:
    from pipelines.builder import MLFLOW_AUTH_KEYS, MLFLOW_AUTH_SECRET, S3_KEYS, S3_SECRET

    done = kube.add_profile("team-a", "--kubeflow-url", "https://kubeflow.example.com/")
    assert done.returncode == 0, done.stderr
    state = kube.read()
    assert state["namespaces"]["team-a"] == {"metaopt.io/pipelines": "enabled"}
    s3, mlflow = kube.secret("team-a", S3_SECRET), kube.secret("team-a", MLFLOW_AUTH_SECRET)
    assert set(s3) == set(S3_KEYS) and set(mlflow) == set(MLFLOW_AUTH_KEYS)
    assert s3["AWS_ACCESS_KEY_ID"] == mlflow["MLFLOW_TRACKING_USERNAME"] == "metaopt-team-a" and len(s3["AWS_SECRET_ACCESS_KEY"]) >= 8
    [job] = state["jobs"]
    assert job["namespace"] == "metaopt" and job["from"] == "cronjob/profile-setup"
    assert job["read"] == {"PROFILE_NAMESPACE": "team-a", "PROFILE_S3_ACCESS_KEY": "metaopt-team-a", "PROFILE_S3_SECRET_KEY": s3["AWS_SECRET_ACCESS_KEY"],
                           "PROFILE_MLFLOW_USERNAME": "metaopt-team-a", "PROFILE_MLFLOW_PASSWORD": mlflow["MLFLOW_TRACKING_PASSWORD"]}  # fmt: skip
    assert "metaopt-profile-setup" not in state["secrets"]["metaopt"], "the hand-over Secret is gone once the Job ran"
    runtime = state["configmaps"]["team-a"]["metaopt-runtime"]
    assert runtime["KFP_UI_URL"] == "https://kubeflow.example.com/pipeline" and runtime["MLFLOW_UI_URL"] == "https://kubeflow.example.com/mlflow"
    assert ["team-a", "ConfigMap", "kfp-launcher"] in state["applied"]
    # no secret value ever on a command line
    secrets = {s3["AWS_SECRET_ACCESS_KEY"], mlflow["MLFLOW_TRACKING_PASSWORD"]}
    assert not [call for call in state["calls"] if any(value in " ".join(call) for value in secrets)]
    # again, without the URL: same keys, the links kept
    assert kube.add_profile("team-a").returncode == 0
    assert kube.secret("team-a", S3_SECRET) == s3 and kube.secret("team-a", MLFLOW_AUTH_SECRET) == mlflow
    assert kube.read()["configmaps"]["team-a"]["metaopt-runtime"]["MLFLOW_UI_URL"] == "https://kubeflow.example.com/mlflow"
    assert len(kube.read()["jobs"]) == 2


def test_add_profile_stops_with_a_reason(kube: Kube, tmp_path: Path) -> None:
    failed = kube.add_profile("team-a", FAKE_JOB_FAILS="1")
    assert failed.returncode == 1 and "profile-setup for team-a did not complete" in failed.stderr
    assert "metaopt-profile-setup" not in kube.read()["secrets"]["metaopt"]
    assert kube.add_profile("no-such-namespace").returncode != 0
    bad = kube.add_profile("team-a", "--kubeflow-url", "kubeflow.example.com")
    assert bad.returncode == 2 and "allowed: the URL users open Kubeflow at" in bad.stderr
    # another add-profile holds the hand-over Secret: this one stops and leaves it alone
    busy = Kube(tmp_path / "busy", secrets={"metaopt": {"metaopt-profile-setup": {"PROFILE_NAMESPACE": base64.b64encode(b"team-b").decode()}}})
    done = busy.add_profile("team-a")
    assert done.returncode == 1 and "another add-profile is running" in done.stderr
    assert busy.secret("metaopt", "metaopt-profile-setup") == {"PROFILE_NAMESPACE": "team-b"} and not busy.read()["jobs"]


# ----------------------------------------------------------------------------- MLflow


class _Keys(BaseHTTPRequestHandler):
    document: bytes = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/dex/keys" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.document if self.path == "/dex/keys" else b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(key: Any, kid: str) -> dict:
    numbers = key.public_key().public_numbers()
    size = (numbers.n.bit_length() + 7) // 8
    return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": _b64(numbers.n.to_bytes(size, "big")), "e": _b64(numbers.e.to_bytes(3, "big"))}


def _token(key: Any, kid: str, claims: dict, alg: str = "RS256") -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{_b64(json.dumps({'alg': alg, 'kid': kid, 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()) if alg == "RS256" else b""
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A live ``mlflow server --app-name basic-auth`` configured as infra/ does it (the ini the
    init container writes, kubeflow_auth.py as the authorization function, the admin from the
    environment), and a JWKS endpoint standing in for Dex."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.fixtures_mlflow import _wait_for_health, free_port, stop_server

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _Keys.document = json.dumps({"keys": [_jwk(key, "dex-1")]}).encode()
    keys = ThreadingHTTPServer(("127.0.0.1", 0), _Keys)
    threading.Thread(target=keys.serve_forever, daemon=True).start()
    issuer = f"http://127.0.0.1:{keys.server_port}/dex"
    work = tmp_path_factory.mktemp("mlflow-auth")
    ini = work / "basic_auth.ini"
    deployment = yaml.safe_load_all((SERVICES / "mlflow.yaml").read_text())
    init = next(d for d in deployment if d["kind"] == "Deployment")["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    function = init.split("authorization_function = ", 1)[1].split("\\n", 1)[0]
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{work / 'auth.db'}\nauthorization_function = {function}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD="admin-password-1",
               MLFLOW_FLASK_SERVER_SECRET_KEY="x" * 24, KUBEFLOW_OIDC_ISSUER=issuer, PYTHONPATH=f"{SERVICES}:{REPO}",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_BACKEND_STORE_URI=f"sqlite:///{work / 'mlflow.db'}")  # fmt: skip
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = work / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(mlflow_cli), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(work))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process, str(log), 120)
        yield {"url": url, "key": key, "issuer": issuer, "admin": ("admin", "admin-password-1")}
    finally:
        stop_server(process)
        keys.shutdown()


@pytest.mark.slow  # a live MLflow server with the auth app (about 40 s on 2 cores)
def test_a_profile_user_is_made_by_the_admin_and_logs_to_the_shared_experiment(auth_server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    sys.path.insert(0, str(SERVICES))
    try:
        import mlflow_profile_user
    finally:
        sys.path.remove(str(SERVICES))
    url, admin = auth_server["url"], auth_server["admin"]
    base = {"MLFLOW_URL": url, "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1], "METAOPT_EXPERIMENT": "metaopt"}
    for profile, password in (("metaopt-team-a", "first-password-a"), ("metaopt-team-b", "team-b-password"), ("metaopt-team-a", "second-password-a")):
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        assert mlflow_profile_user.main({**base, "PROFILE_MLFLOW_USERNAME": profile, "PROFILE_MLFLOW_PASSWORD": password}) == 0

    def create_run(user: str, password: str) -> int:
        experiment = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "metaopt"}, auth=(user, password), timeout=10)
        assert experiment.status_code == 200, experiment.text
        body = {"experiment_id": experiment.json()["experiment"]["experiment_id"]}
        return requests.post(f"{url}/api/2.0/mlflow/runs/create", json=body, auth=(user, password), timeout=10).status_code

    assert create_run("metaopt-team-a", "second-password-a") == 200  # re-keyed, and EDIT on the shared experiment
    assert create_run("metaopt-team-b", "team-b-password") == 200
    assert (
        requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 5}, auth=("metaopt-team-a", "first-password-a"), timeout=10).status_code
        == 401
    )
    owner = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "metaopt"}, auth=admin, timeout=10).json()
    assert owner["experiment"]["name"] == "metaopt"


@pytest.mark.slow
def test_kubeflow_login_tokens_pass_and_forgeries_do_not(auth_server: dict) -> None:
    import requests
    from cryptography.hazmat.primitives.asymmetric import rsa

    url, key, issuer = auth_server["url"], auth_server["key"], auth_server["issuer"]
    search = f"{url}/api/2.0/mlflow/experiments/search"
    claims = {"iss": issuer, "sub": "C1", "aud": "kubeflow-oidc-authservice", "email": "alice@example.com", "exp": int(time.time()) + 600}

    def status(token: str) -> int:
        return requests.get(search, params={"max_results": 1}, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

    assert status(_token(key, "dex-1", claims)) == 200
    user = requests.get(f"{url}/api/2.0/mlflow/users/get", params={"username": "alice@example.com"}, auth=auth_server["admin"], timeout=10)
    assert user.status_code == 200 and user.json()["user"]["is_admin"] is False  # made on first sight, with default rights
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert status(_token(other, "dex-1", claims)) == 401  # not signed by the issuer
    assert status(_token(key, "dex-1", {**claims, "exp": int(time.time()) - 120})) == 401  # expired
    assert status(_token(key, "dex-1", {**claims, "iss": "http://evil.example.com/dex"})) == 401
    assert status(_token(key, "dex-1", {**claims, "email": "admin"}, alg="none")) == 401
    genuine = _token(key, "dex-1", claims)
    assert status(genuine.rsplit(".", 1)[0] + "." + _token(key, "dex-1", {**claims, "email": "admin"}).rsplit(".", 1)[1]) == 401  # swapped signature
    assert status("not-a-jwt") == 401
    # inside the cluster, Basic auth as before
    assert requests.get(search, params={"max_results": 1}, auth=auth_server["admin"], timeout=10).status_code == 200
    assert requests.get(search, params={"max_results": 1}, auth=("admin", "wrong"), timeout=10).status_code == 401
