"""Validate an object against a CRD's ``openAPIV3Schema`` the way the Kubernetes API server does on
create with strict field validation (``kubectl apply`` since 1.27, ``--validate=strict``).

The structural-schema rules that matter for a create: types (with ``x-kubernetes-int-or-string``,
``nullable``), ``required``, ``enum``, ``pattern``, lengths, bounds, ``format`` int32/int64,
``anyOf``/``allOf``/``oneOf``/``not``, list types ``set``/``map`` (no duplicates), maps
(``additionalProperties``), embedded resources, and unknown fields: a field a schema does not
declare is an error unless ``x-kubernetes-preserve-unknown-fields`` keeps it (the API server
would prune it silently without strict validation: a setting that never arrives).

CEL rules (``x-kubernetes-validations``) are evaluated from a table of the rules the supported
Trainer releases carry, translated by hand (:data:`CEL_RULES`); transition rules (``oldSelf``)
only apply to updates and are skipped. A rule not in the table is an error, so a new release's
rule is looked at before the tests pass against it.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _has(value: Any, key: str) -> bool:
    return isinstance(value, dict) and key in value


# Each supported Trainer release's CEL rules on TrainJob / ClusterTrainingRuntime, as Python.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')": lambda s: re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", s["metadata"]["name"]) is not None,
    "size(self.metadata.name) <= 63": lambda s: len(s["metadata"]["name"]) <= 63,
    "self in ['trainer.kubeflow.org/trainjob-controller', 'kueue.x-k8s.io/multikueue']": lambda s: (
        s in ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
    ),
    "!(has(self.numNodes) && (has(self.torch) && has(self.torch.elasticPolicy)))": lambda s: (
        not (_has(s, "numNodes") and _has(s, "torch") and _has(s["torch"], "elasticPolicy"))
    ),
    "!(has(self.torch) && has(self.mpi))": lambda s: not (_has(s, "torch") and _has(s, "mpi")),
    "self > 0 || self in ['auto', 'cpu', 'gpu']": lambda s: (isinstance(s, int) and s > 0) or s in ("auto", "cpu", "gpu"),
    "!(has(self.startupPolicy) && self.startupPolicy.startupPolicyOrder == 'InOrder' && self.replicatedJobs.exists(x, has(x.dependsOn)))": lambda s: (
        not (
            _has(s, "startupPolicy")
            and s["startupPolicy"].get("startupPolicyOrder") == "InOrder"
            and any(_has(x, "dependsOn") for x in s.get("replicatedJobs", []))
        )
    ),
    "[has(self.torch), has(self.mpi), has(self.jax), has(self.xgboost),has(self.flux)].filter(x, x).size() <= 1": lambda s: (
        sum(_has(s, k) for k in ("torch", "mpi", "jax", "xgboost", "flux")) <= 1
    ),
    "self >= 1": lambda s: s >= 1,
    "self.templates.all(t, !has(t.metadata.namespace) || size(t.metadata.namespace) == 0)": lambda s: all(
        not t.get("metadata", {}).get("namespace") for t in s.get("templates", [])
    ),
    "!self.exists(c, c == 'node')": lambda s: "node" not in s,
    "self == '' || self.matches('^[A-Za-z][A-Za-z0-9+.-]*://.+$')": lambda s: s == "" or re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://.+", s) is not None,
    "has(self.lastUpdatedTime)": lambda s: _has(s, "lastUpdatedTime"),
}


class SchemaError(AssertionError):
    """The API server would reject the object: ``path`` and why."""


def _integer(value: Any) -> bool:
    # JSON numbers arrive as float64 where they have a fraction part in the text ("3.0"); the API
    # server's validator (go-openapi) takes an integral one as an integer
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))


def _type_ok(schema: dict, value: Any) -> bool:
    if value is None:
        return bool(schema.get("nullable"))
    if schema.get("x-kubernetes-int-or-string"):
        return _integer(value) or isinstance(value, str)
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": _integer,
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    return kind is None or checks[kind](value)


def validate(schema: dict, value: Any, path: str = "", *, root: bool = True) -> list[str]:
    """Every reason the API server would reject ``value`` under ``schema`` (empty: accepted)."""
    errors: list[str] = []
    where = path or "<root>"
    if not _type_ok(schema, value):
        return [f"{where}: expected {schema.get('type', 'int-or-string')}, got {type(value).__name__} {value!r:.60}"]
    if value is None:
        return []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: checked on update only
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            errors.append(f"{where}: CEL rule not translated in tests/upstream/openapi.py: {rule['rule']}")
        elif not check(value):
            errors.append(f"{where}: {rule.get('message', rule['rule'])}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: length {len(value)} outside [{schema.get('minLength', 0)}, {schema.get('maxLength', 'inf')}]")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not isinstance(value, str):
        low, high = {"int32": _INT32, "int64": _INT64}.get(schema.get("format", ""), (None, None))
        low = schema.get("minimum", low)
        high = schema.get("maximum", high)
        if (low is not None and value < low) or (high is not None and value > high):
            errors.append(f"{where}: {value} outside [{low}, {high}]")
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            passing = [not validate(branch, value, path, root=False) for branch in schema[key]]
            if (key == "allOf" and not all(passing)) or (key == "anyOf" and not any(passing)) or (key == "oneOf" and sum(passing) != 1):
                errors.append(f"{where}: fails {key}")
    if "not" in schema and not validate(schema["not"], value, path, root=False):
        errors.append(f"{where}: matches 'not'")
    if isinstance(value, dict):
        errors += _validate_object(schema, value, path, root)
    if isinstance(value, list):
        errors += _validate_array(schema, value, path)
    return errors


def _validate_object(schema: dict, value: dict, path: str, root: bool) -> list[str]:
    errors = [f"{path or '<root>'}: missing required field {name!r}" for name in schema.get("required", []) if name not in value]
    properties = schema.get("properties", {})
    implicit = {"apiVersion", "kind", "metadata"} if root or schema.get("x-kubernetes-embedded-resource") else set()
    for key, item in value.items():
        child = f"{path}.{key}" if path else key
        if key == "metadata" and key in implicit:  # ObjectMeta of the object itself, whatever the schema says of it
            errors += _validate_metadata(item, child)
        elif key in properties:
            errors += validate(properties[key], item, child, root=False)
        elif key in implicit:
            continue  # apiVersion and kind: the API server routes by them
        elif isinstance(schema.get("additionalProperties"), dict):
            errors += validate(schema["additionalProperties"], item, child, root=False)
        elif schema.get("additionalProperties") is True or schema.get("x-kubernetes-preserve-unknown-fields"):
            continue
        else:
            errors.append(f"{child}: unknown field (strict field validation rejects it; without it the API server drops it)")
    if len(value) > schema.get("maxProperties", len(value)):
        errors.append(f"{path}: more than {schema['maxProperties']} properties")
    return errors


def _validate_array(schema: dict, value: list, path: str) -> list[str]:
    errors: list[str] = []
    if len(value) > schema.get("maxItems", len(value)) or len(value) < schema.get("minItems", 0):
        errors.append(f"{path}: {len(value)} items outside [{schema.get('minItems', 0)}, {schema.get('maxItems', 'inf')}]")
    items = schema.get("items")
    for index, item in enumerate(value):
        if isinstance(items, dict):
            errors += validate(items, item, f"{path}[{index}]", root=False)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set" and len({repr(v) for v in value}) != len(value):
        errors.append(f"{path}: duplicate items in a set")
    if list_type == "map":
        keys = [tuple(item.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])) for item in value]
        if len(set(keys)) != len(keys):
            errors.append(f"{path}: duplicate map keys {schema.get('x-kubernetes-list-map-keys')}")
    return errors


_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _validate_metadata(meta: Any, path: str) -> list[str]:
    """What the API server checks of ObjectMeta on any object: name, label keys and values."""
    if not isinstance(meta, dict):
        return [f"{path}: expected object"]
    errors = []
    name = meta.get("name", "")
    if name and (len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name)):
        errors.append(f"{path}.name: {name!r} is not a DNS-1123 subdomain")
    for key, label in (meta.get("labels") or {}).items():
        if not isinstance(label, str) or len(label) > 63 or not _LABEL_VALUE.fullmatch(label):
            errors.append(f"{path}.labels[{key}]: {label!r} is not a valid label value")
    for key, note in (meta.get("annotations") or {}).items():
        if not isinstance(note, str):
            errors.append(f"{path}.annotations[{key}]: must be a string")
    return errors


def crd_schema(crd: dict, version: str = "v1alpha1") -> dict:
    """The ``openAPIV3Schema`` of ``version`` of ``crd``."""
    for item in crd["spec"]["versions"]:
        if item["name"] == version:
            return item["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{crd['metadata']['name']} serves no version {version}")


def validate_against_crd(crd: dict, obj: dict) -> list[str]:
    """``obj`` (kind and apiVersion included) checked against the CRD that serves it."""
    group, _, version = obj["apiVersion"].partition("/")
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == group and names["kind"] == obj["kind"], f"{crd['metadata']['name']} does not serve {obj['apiVersion']} {obj['kind']}"
    errors = validate(crd_schema(crd, version), obj)
    if crd["spec"]["scope"] == "Cluster" and obj.get("metadata", {}).get("namespace"):
        errors.append("metadata.namespace: a cluster-scoped object has none")
    return errors
