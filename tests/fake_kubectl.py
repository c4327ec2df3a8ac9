"""A stand-in for ``kubectl``, for the commands infra/add-profile.sh runs, over a cluster kept in a
JSON file ($FAKE_KUBE_STATE): namespaces, Secrets, ConfigMaps, Jobs. ``kubectl kustomize`` is the
real one ($REAL_KUBECTL). Creating a Job from the CronJob profile-setup records what the Secret
metaopt-profile-setup held at that moment (what the Job would read); $FAKE_JOB_FAILS makes the Job
fail. Every call is appended to the state's "calls".
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def _env_file(path: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in Path(path).read_text().splitlines() if line and not line.startswith("#")]
    return {key: base64.b64encode(value.encode()).decode() for key, value in pairs}


def main(argv: list[str]) -> int:
    if argv[:1] == ["kustomize"]:
        return subprocess.run([os.environ["REAL_KUBECTL"], *argv]).returncode
    path = Path(os.environ["FAKE_KUBE_STATE"])
    state = json.loads(path.read_text())
    state["calls"].append(argv)
    args, namespace = list(argv), "default"
    if "-n" in args:
        at = args.index("-n")
        namespace = args[at + 1]
        del args[at : at + 2]
    options = {a.split("=", 1)[0]: (a.split("=", 1) + [""])[1] for a in args if a.startswith("--")}
    words = [a for a in args if not a.startswith("--") and a not in ("-o", "-f")]
    output = args[args.index("-o") + 1] if "-o" in args else ""
    secrets = state["secrets"].setdefault(namespace, {})
    code, out = 0, ""

    def not_found(kind: str, name: str) -> tuple[int, str]:
        return 1, f'Error from server (NotFound): {kind} "{name}" not found'

    if words[:2] == ["get", "namespace"]:
        code, out = (0, f"namespace/{words[2]}") if words[2] in state["namespaces"] else not_found("namespaces", words[2])
    elif words[:2] == ["label", "namespace"]:
        key, _, value = words[3].partition("=")
        state["namespaces"][words[2]][key] = value
    elif words[:2] == ["get", "secret"] or words[:2] == ["get", "configmap"]:
        store = secrets if words[1] == "secret" else state["configmaps"].setdefault(namespace, {})
        if words[2] not in store:
            code, out = not_found(words[1] + "s", words[2])
        else:
            out = store[words[2]].get(output.removeprefix("jsonpath={.data.").removesuffix("}"), "")
    elif words[:3] == ["create", "secret", "generic"]:
        data = _env_file(options["--from-env-file"])
        if options.get("--dry-run") == "client":
            out = yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": words[3], "namespace": namespace}, "data": data})
        elif words[3] in secrets:
            code, out = 1, f'error: failed to create secret secrets "{words[3]}" already exists'
        else:
            secrets[words[3]] = data
    elif words[:1] == ["apply"]:
        for doc in yaml.safe_load_all(Path(args[args.index("-f") + 1]).read_text()):
            where = doc["metadata"].get("namespace", namespace)
            if doc["kind"] == "Secret":
                state["secrets"].setdefault(where, {})[doc["metadata"]["name"]] = doc["data"]
            elif doc["kind"] == "ConfigMap":
                state["configmaps"].setdefault(where, {})[doc["metadata"]["name"]] = doc["data"]
            state["applied"].append([where, doc["kind"], doc["metadata"]["name"]])
    elif words[:2] == ["create", "job"]:
        staged = {k: base64.b64decode(v).decode() for k, v in secrets.get("metaopt-profile-setup", {}).items()}
        state["jobs"].append({"namespace": namespace, "name": words[2], "from": options["--from"], "read": staged,
                              "failed": bool(os.environ.get("FAKE_JOB_FAILS"))})  # fmt: skip
    elif words[:1] == ["wait"]:
        job = next(j for j in state["jobs"] if j["name"] == words[1].removeprefix("job/"))
        code, out = (1, "error: timed out waiting for the condition") if job["failed"] else (0, f"job.batch/{job['name']} condition met")
    elif words[:1] == ["logs"]:
        out = "mlflow-user: MLflow at http://mlflow:5000 did not answer"
    elif words[:2] == ["delete", "secret"]:
        secrets.pop(words[2], None)
    else:
        code, out = 1, f"fake kubectl: unsupported command {argv}"
    path.write_text(json.dumps(state))
    if out:
        print(out, file=sys.stderr if code else sys.stdout, end="" if "jsonpath" in output else "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
