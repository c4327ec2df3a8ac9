#!/usr/bin/env bash
# Give one profile namespace its own metaopt identity, in one command (infra/README.md, step 4):
#
#   infra/add-profile.sh NAMESPACE [--kubeflow-url https://kubeflow.example.com]
#
# NAMESPACE is a Kubeflow profile namespace (where multi-user KFP runs that profile's pipelines),
# or "kubeflow" for standalone KFP. It
#   1. labels the namespace metaopt.io/pipelines=enabled (the NetworkPolicies of namespace
#      metaopt admit its pipeline pods and notebooks),
#   2. creates the profile's credentials, once: a MinIO user and an MLflow user, both named
#      metaopt-<NAMESPACE>, with random secrets, as the Secrets metaopt-s3 and metaopt-mlflow-auth
#      in the namespace (re-running keeps the existing ones),
#   3. has the Job profile-setup (a template in namespace metaopt) create them in MinIO (policy
#      metaopt-pipelines) and MLflow (EDIT on the shared experiment "metaopt"), through a Secret
#      that exists only while the Job runs,
#   4. applies the namespace's metaopt-runtime and kfp-launcher ConfigMaps; with --kubeflow-url
#      (else the values already there) the run reports link the KFP UI (<url>/pipeline) and the
#      MLflow UI through Kubeflow's gateway (<url>/mlflow).
# Idempotent. Needs kubectl (with kustomize) and openssl; secrets pass through files only this
# user can read, never through command-line arguments.
set -euo pipefail

usage() { echo "usage: $0 NAMESPACE [--kubeflow-url https://kubeflow.example.com]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
namespace=$1
shift
kubeflow_url=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --kubeflow-url) [[ $# -ge 2 ]] || usage; kubeflow_url=${2%/}; shift 2 ;;
    *) usage ;;
  esac
done
if [[ -n $kubeflow_url && $kubeflow_url != https://* && $kubeflow_url != http://* ]]; then
  echo "--kubeflow-url: got '$kubeflow_url'; allowed: the URL users open Kubeflow at, e.g. https://kubeflow.example.com" >&2
  exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
identity="metaopt-${namespace}"
work=$(mktemp -d)
chmod 700 "$work"
staged=""
cleanup() {
  rm -rf "$work"
  [[ -z $staged ]] || kubectl -n metaopt delete secret metaopt-profile-setup --ignore-not-found >/dev/null 2>&1 || true
}
trap cleanup EXIT

kubectl get namespace "$namespace" -o name >/dev/null
kubectl get namespace metaopt -o name >/dev/null  # infra/base (or an overlay) must be applied first
kubectl label namespace "$namespace" metaopt.io/pipelines=enabled --overwrite >/dev/null

# A key of a Secret in the profile namespace, decoded; empty when the Secret or key is missing.
secret_value() {
  local encoded
  encoded=$(kubectl -n "$namespace" get secret "$1" -o "jsonpath={.data.$2}" 2>/dev/null) || return 0
  [[ -n $encoded ]] && printf '%s' "$encoded" | base64 -d
}
s3_key=$(secret_value metaopt-s3 AWS_ACCESS_KEY_ID)
s3_secret=$(secret_value metaopt-s3 AWS_SECRET_ACCESS_KEY)
mlflow_user=$(secret_value metaopt-mlflow-auth MLFLOW_TRACKING_USERNAME)
mlflow_password=$(secret_value metaopt-mlflow-auth MLFLOW_TRACKING_PASSWORD)
[[ -n $s3_key && -n $s3_secret ]] || { s3_key=$identity; s3_secret=$(openssl rand -hex 20); }
[[ -n $mlflow_user && -n $mlflow_password ]] || { mlflow_user=$identity; mlflow_password=$(openssl rand -hex 24); }

# write_env FILE KEY=VALUE...: an env file for kubectl --from-env-file, readable by this user only
write_env() {
  local file=$1
  shift
  (umask 077 && printf '%s\n' "$@" >"$file")
}
write_env "$work/s3.env" "AWS_ACCESS_KEY_ID=$s3_key" "AWS_SECRET_ACCESS_KEY=$s3_secret"
write_env "$work/mlflow.env" "MLFLOW_TRACKING_USERNAME=$mlflow_user" "MLFLOW_TRACKING_PASSWORD=$mlflow_password"
write_env "$work/setup.env" "PROFILE_NAMESPACE=$namespace" "PROFILE_S3_ACCESS_KEY=$s3_key" "PROFILE_S3_SECRET_KEY=$s3_secret" \
  "PROFILE_MLFLOW_USERNAME=$mlflow_user" "PROFILE_MLFLOW_PASSWORD=$mlflow_password"
for pair in metaopt-s3:s3.env metaopt-mlflow-auth:mlflow.env; do
  kubectl -n "$namespace" create secret generic "${pair%%:*}" --from-env-file="$work/${pair#*:}" --dry-run=client -o yaml >"$work/secret.yaml"
  kubectl -n "$namespace" apply -f "$work/secret.yaml" >/dev/null
done

# create, not apply: a second add-profile running at the same time stops here instead of mixing profiles
if ! kubectl -n metaopt create secret generic metaopt-profile-setup --from-env-file="$work/setup.env" >/dev/null; then
  echo "another add-profile is running (or one died: kubectl -n metaopt delete secret metaopt-profile-setup)" >&2
  exit 1
fi
staged=1
job="profile-setup-$(date +%s)"
kubectl -n metaopt create job "$job" --from=cronjob/profile-setup >/dev/null
if ! kubectl -n metaopt wait --for=condition=complete "job/$job" --timeout=10m >/dev/null; then
  kubectl -n metaopt logs "job/$job" --all-containers >&2 || true
  echo "profile-setup for $namespace did not complete: kubectl -n metaopt describe job/$job" >&2
  exit 1
fi

runtime=$(kubectl kustomize "$here/base/pipeline-namespace")
for key in KFP_UI_URL MLFLOW_UI_URL; do
  case $key in
    KFP_UI_URL) value=${kubeflow_url:+$kubeflow_url/pipeline} ;;
    MLFLOW_UI_URL) value=${kubeflow_url:+$kubeflow_url/mlflow} ;;
  esac
  [[ -n $value ]] || value=$(kubectl -n "$namespace" get configmap metaopt-runtime -o "jsonpath={.data.$key}" 2>/dev/null || true)
  runtime=${runtime//"$key: \"\""/"$key: \"$value\""}
done
printf '%s\n' "$runtime" >"$work/runtime.yaml"
kubectl -n "$namespace" apply -f "$work/runtime.yaml" >/dev/null
echo "profile $namespace: MinIO and MLflow user $identity ready (Secrets metaopt-s3, metaopt-mlflow-auth); metaopt-runtime and kfp-launcher applied"
