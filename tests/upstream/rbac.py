"""Kubernetes RBAC evaluated over manifests: who may do what, as the API server's RBAC authorizer
decides it (rules with ``*``, subresources, ClusterRole aggregation, RoleBindings granting only in
their namespace, cluster-scoped resources only through ClusterRoleBindings, service accounts'
groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Subject:
    user: str
    groups: frozenset[str]


def service_account(namespace: str, name: str) -> Subject:
    """A service account as the API server authenticates its token."""
    return Subject(f"system:serviceaccount:{namespace}:{name}",
                   frozenset({"system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"}))  # fmt: skip


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"aggregation selectors with {sorted(selector)} are not read here"
    return selector.get("matchLabels", {}).items() <= labels.items()


class Authorizer:
    """RBAC over ``objects`` (Roles, ClusterRoles, RoleBindings, ClusterRoleBindings; others ignored)."""

    def __init__(self, objects: Iterable[dict]):
        objects = [o for o in objects if o.get("apiVersion", "").startswith("rbac.authorization.k8s.io/")]
        self.cluster_roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
        self.roles = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects if o["kind"] == "Role"}
        self.role_bindings = [o for o in objects if o["kind"] == "RoleBinding"]
        self.cluster_role_bindings = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
        self._aggregated = self._aggregate()

    def _aggregate(self) -> dict[str, list[dict]]:
        """Each ClusterRole's rules after the aggregation controller filled the aggregated ones."""
        rules = {name: list(role.get("rules") or []) for name, role in self.cluster_roles.items()}
        changed = True
        while changed:  # aggregated roles can aggregate aggregated roles
            changed = False
            for name, role in self.cluster_roles.items():
                selectors = (role.get("aggregationRule") or {}).get("clusterRoleSelectors", [])
                if not selectors:
                    continue
                for other, other_role in self.cluster_roles.items():
                    labels = other_role["metadata"].get("labels", {})
                    if other != name and any(_selects(s, labels) for s in selectors):
                        for rule in rules[other]:
                            if rule not in rules[name]:
                                rules[name].append(rule)
                                changed = True
        return rules

    def rules_of(self, role_ref: dict, namespace: str | None) -> list[dict]:
        if role_ref["kind"] == "ClusterRole":
            return self._aggregated.get(role_ref["name"], [])
        role = self.roles.get((namespace, role_ref["name"]))
        return list(role.get("rules") or []) if role else []

    @staticmethod
    def binds(binding: dict, subject: Subject) -> bool:
        for item in binding.get("subjects") or []:
            kind = item["kind"]
            if kind == "ServiceAccount":
                assert item.get("namespace"), f"{binding['metadata']['name']}: a ServiceAccount subject needs a namespace (the API server rejects it)"
            if kind == "ServiceAccount" and subject.user == f"system:serviceaccount:{item['namespace']}:{item['name']}":
                return True
            if kind == "User" and subject.user == item["name"]:
                return True
            if kind == "Group" and item["name"] in subject.groups:
                return True
        return False

    @staticmethod
    def rule_allows(rule: dict, verb: str, group: str, resource: str, name: str = "") -> bool:
        if "nonResourceURLs" in rule and not rule.get("resources"):
            return False
        groups, resources, verbs = rule.get("apiGroups") or [], rule.get("resources") or [], rule.get("verbs") or []
        names = rule.get("resourceNames") or []
        return (
            ("*" in groups or group in groups)
            and ("*" in resources or resource in resources or (f"{resource.split('/')[0]}/*" in resources and "/" in resource))
            and ("*" in verbs or verb in verbs)
            and (not names or name in names)
        )

    def grants(self, subject: Subject) -> list[tuple[str | None, dict, dict]]:
        """(namespace or None for cluster-wide, rule, binding) of every rule ``subject`` holds."""
        held = []
        for binding in self.cluster_role_bindings:
            if self.binds(binding, subject):
                held += [(None, rule, binding) for rule in self.rules_of(binding["roleRef"], None)]
        for binding in self.role_bindings:
            namespace = binding["metadata"].get("namespace")
            if self.binds(binding, subject):
                held += [(namespace, rule, binding) for rule in self.rules_of(binding["roleRef"], namespace)]
        return held

    def allowed(self, subject: Subject, verb: str, group: str, resource: str, namespace: str | None, name: str = "") -> bool:
        """``namespace`` None: a cluster-scoped resource (only ClusterRoleBindings grant those)."""
        for scope, rule, _ in self.grants(subject):
            if (scope is None or scope == namespace) and self.rule_allows(rule, verb, group, resource, name):
                return True
        return False


__all__ = ["Authorizer", "Subject", "service_account"]
