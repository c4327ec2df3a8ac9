"""A stand-in for MinIO's client ``mc`` RELEASE.2025-04-16T18-13-26Z (the setup Jobs' image), for
the commands the setup scripts run, over a MinIO kept in a JSON file ($FAKE_MINIO_STATE).

It answers as that release does against MinIO RELEASE.2025-04-22T22-12-26Z (sources read at those
tags of github.com/minio/mc and github.com/minio/minio):

- ``admin user info TARGET USER`` prints ``AccessKey: USER``, ``Status: enabled``,
  ``PolicyName: <policies>``, ``MemberOf: []`` (cmd/admin-user-add.go, userMessage.String, op
  "info"; no Authentication line for builtin users); with ``--json`` the same as indented JSON,
  status first and empty fields left out (userMessage.JSON: json.MarshalIndent(u, "", " ")).
- ``admin policy attach TARGET POLICY --user USER`` attaches; when the policy is attached already
  the server answers XMinioAdminPolicyChangeAlreadyApplied ("Specified policy update has no net
  effect", cmd/iam-store.go) and this mc release takes that as success (cmd/admin-policy-attach.go,
  errCodeChangeAlreadyApplied, since RELEASE.2024-10-08T09-37-26Z), printing
  ``Attached Policies: [POLICY]`` / ``To User: USER``.
- ``admin user add`` creates the user or sets its secret key; ``admin policy create`` creates or
  replaces a policy; ``mb --ignore-existing`` and ``ls`` do what they say.

Every call is appended to the state's "calls".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    path = Path(os.environ["FAKE_MINIO_STATE"])
    state = json.loads(path.read_text()) if path.exists() else {"buckets": [], "policies": {}, "users": {}, "calls": []}
    state["calls"].append(argv)
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    code, out = 0, ""
    if args[:1] == ["ls"]:
        out = "\n".join(f"[2025-01-01 00:00:00 UTC]     0B {bucket}/" for bucket in state["buckets"])
    elif args[:1] == ["mb"]:
        bucket = args[-1].split("/", 1)[1]
        if bucket not in state["buckets"]:
            state["buckets"].append(bucket)
        out = f"Bucket created successfully `{args[-1]}`."
    elif args[:3] == ["admin", "policy", "create"]:
        state["policies"][args[4]] = json.loads(Path(args[5]).read_text())
        out = f"Created policy `{args[4]}` successfully."
    elif args[:3] == ["admin", "user", "add"]:
        user = state["users"].setdefault(args[4], {"policies": [], "status": "enabled"})
        user["secret"] = args[5]
        out = f"Added user `{args[4]}` successfully."
    elif args[:3] == ["admin", "user", "info"]:
        name = args[4]
        if name not in state["users"]:
            code, out = 1, "mc: <ERROR> Unable to get user info. The specified user does not exist. (Specified user does not exist)"
        else:
            policy = ",".join(state["users"][name]["policies"])
            if as_json:
                message = {"status": "success", "accessKey": name, "policyName": policy, "userStatus": "enabled"}
                out = json.dumps({k: v for k, v in message.items() if v}, indent=" ")
            else:
                out = f"AccessKey: {name}\nStatus: enabled\nPolicyName: {policy}\nMemberOf: []"
    elif args[:3] == ["admin", "policy", "attach"]:
        user, policies = args[args.index("--user") + 1], args[4 : args.index("--user")]
        if user not in state["users"] or any(p not in state["policies"] for p in policies):
            code, out = 1, "mc: <ERROR> Unable to make user/group policy association. The specified user or policy does not exist."
        else:
            attached = state["users"][user]["policies"]
            new = [p for p in policies if p not in attached]
            attached += new  # none new: XMinioAdminPolicyChangeAlreadyApplied, which this mc release ignores
            if as_json:
                out = json.dumps({"status": "success", "policiesAttached": policies, "user": user}, indent=" ")
            else:
                listed = "[" + " ".join(policies) + "]"  # Go's %v of a []string
                out = f"Attached Policies: {listed}\nTo User: {user}"
    else:
        code, out = 1, f"fake mc: unsupported command {argv}"
    path.write_text(json.dumps(state))
    print(out, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
