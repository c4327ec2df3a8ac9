# Shell functions of MinIO's setup Jobs (sourced by minio-buckets and profile-setup; bash + mc only:
# the mc image has no grep, sed or jq). mc is the release of the Jobs' image,
# quay.io/minio/mc:RELEASE.2025-04-16T18-13-26Z; tests/test_manifests.py runs these functions
# against a stand-in mc that answers as that release does.

# Point mc's alias "root" at MinIO with its root credentials (from the environment, never from
# arguments) and wait until MinIO answers.
minio_connect() {
  export MC_HOST_root="http://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${MINIO_HOST}"
  local attempt
  for ((attempt = 1; attempt <= 60; attempt++)); do
    mc ls root >/dev/null 2>&1 && return 0
    echo "waiting for MinIO at ${MINIO_HOST} (${attempt}/60)"
    sleep 5
  done
  echo "MinIO at ${MINIO_HOST} did not answer" >&2
  return 1
}

# minio_user POLICY ACCESS_KEY SECRET_KEY: the user exists with that secret key and the policy
# attached. Idempotent by construction, with no output parsing: `user add` sets the secret key of
# an existing user, and `policy attach` succeeds when the policy is already attached (mc since
# RELEASE.2024-10-08T09-37-26Z treats the server's XMinioAdminPolicyChangeAlreadyApplied as done).
minio_user() {
  mc admin user add root "$2" "$3" >/dev/null
  mc admin policy attach root "$1" --user "$2" >/dev/null
  echo "MinIO user $2: policy $1 attached"
}
