"""CPU, memory and a timeout for every pipeline step, sized by the kind of step, and the
compile-time overrides (``--resources train.memory_limit=32Gi --resources train.timeout=48h``).

Every step requests CPU and memory and has limits on both, so its pod is never BestEffort and a
namespace ResourceQuota (which demands requests and limits) admits it. Memory request equals the
limit for the steps that hold data, so they are not the first ones evicted under memory pressure.
The timeout is the pod's ``activeDeadlineSeconds`` (kfp-kubernetes ``set_timeout``): past it
Kubernetes kills the pod, the step fails, and KFP retries it (steps with a retry policy) or fails
the run, so a hung step never holds its node (or GPU) for ever.

Kinds: ``control`` (MLflow and registry calls, the skip report), ``data`` (reads datasets:
prepare, initial state, ask, tell), ``train`` (meta-training blocks and fan-out shards),
``meta_test``, ``submit`` (the step that submits and waits for a TrainJob: small, long timeout).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

STEP_KINDS = ("control", "data", "train", "meta_test", "submit")
FIELDS = ("cpu", "cpu_limit", "memory", "memory_limit", "timeout")
_CPU = re.compile(r"^(?:[0-9]*\.)?[0-9]+m?$")  # what kfp's set_cpu_request accepts
_MEMORY = re.compile(r"^(?:[0-9]*\.)?[0-9]+(?:E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")
_DURATION = re.compile(r"^([0-9]+)([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _cpu_millis(value: str) -> float:
    return float(value[:-1]) if value.endswith("m") else float(value) * 1000


def _bytes(value: str) -> float:
    match = re.match(r"^((?:[0-9]*\.)?[0-9]+)([A-Za-z]*)$", value)
    number, unit = float(match[1]), match[2]
    powers = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    return number * (1024 ** "KMGTPE".index(unit[0]) * 1024 if unit.endswith("i") else powers[unit])


@dataclasses.dataclass(frozen=True)
class StepResources:
    """What one step's container asks for: Kubernetes quantities, and a timeout in seconds."""

    cpu: str
    cpu_limit: str
    memory: str
    memory_limit: str
    timeout: int

    def __post_init__(self) -> None:
        for name in ("cpu", "cpu_limit"):
            if not _CPU.match(str(getattr(self, name))):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; allowed: CPUs as 2, 0.5 or 500m")
        for name in ("memory", "memory_limit"):
            if not _MEMORY.match(str(getattr(self, name))):
                raise ValueError(f"{name}: got {getattr(self, name)!r}; allowed: bytes as 512Mi, 8Gi or 1G")
        if _cpu_millis(self.cpu) > _cpu_millis(self.cpu_limit):
            raise ValueError(f"cpu {self.cpu} exceeds cpu_limit {self.cpu_limit}")
        if _bytes(self.memory) > _bytes(self.memory_limit):
            raise ValueError(f"memory {self.memory} exceeds memory_limit {self.memory_limit}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int) or self.timeout <= 0:
            raise ValueError(f"timeout: got {self.timeout!r}; allowed: seconds > 0, or a duration such as 90m, 12h, 2d")


# Sized for the demo and paper configurations (docs/benchmarks.md); override per cluster.
CPU_DEFAULTS: dict[str, StepResources] = {
    "control": StepResources("250m", "1", "512Mi", "1Gi", 30 * 60),
    "data": StepResources("1", "2", "4Gi", "4Gi", 2 * 3600),
    "train": StepResources("2", "4", "8Gi", "8Gi", 24 * 3600),
    "meta_test": StepResources("2", "4", "8Gi", "8Gi", 12 * 3600),
    "submit": StepResources("250m", "1", "512Mi", "1Gi", 7 * 86400),
}
# GPU steps: one GPU each (set by the builder), plus the CPUs and memory that feed it.
GPU_DEFAULTS: dict[str, StepResources] = {
    "train": StepResources("4", "8", "24Gi", "24Gi", 24 * 3600),
    "meta_test": StepResources("4", "8", "24Gi", "24Gi", 12 * 3600),
}


def parse_duration(value: Any) -> int:
    """Seconds from ``3600``, ``"3600s"``, ``"90m"``, ``"12h"`` or ``"2d"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError(f"timeout: got {value!r}; allowed: seconds, or a number with s, m, h or d (90m, 12h, 2d)")
    return int(match[1]) * _SECONDS[match[2]]


def resources_for(kind: str, gpu: bool, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> StepResources:
    """The resources of a step of ``kind`` (GPU sizes for GPU steps), with ``overrides[kind]`` applied."""
    if kind not in STEP_KINDS:
        raise ValueError(f"step kind: got {kind!r}; allowed: {list(STEP_KINDS)}")
    base = GPU_DEFAULTS[kind] if gpu and kind in GPU_DEFAULTS else CPU_DEFAULTS[kind]
    changes = dict((overrides or {}).get(kind, {}))
    if "timeout" in changes:
        changes["timeout"] = parse_duration(changes["timeout"])
    for name in ("cpu", "cpu_limit", "memory", "memory_limit"):
        if name in changes:
            changes[name] = str(changes[name])
    return dataclasses.replace(base, **changes)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.memory_limit=32Gi", "train.timeout=48h"]`` -> ``{"train": {...}}``, each checked."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        kind, dot, field = key.strip().partition(".")
        if not sep or not dot or kind not in STEP_KINDS or field not in FIELDS or not value.strip():
            raise ValueError(f"--resources: got {item!r}; allowed: KIND.FIELD=VALUE with KIND in {list(STEP_KINDS)} "
                             f"and FIELD in {list(FIELDS)}, e.g. train.memory_limit=32Gi or meta_test.timeout=6h")  # fmt: skip
        out.setdefault(kind, {})[field] = value.strip()
    for kind in out:  # every combination must still make valid resources, on CPU and on GPU
        resources_for(kind, False, out), resources_for(kind, True, out)
    return out


def apply_resources(task: Any, resources: StepResources, *, kubernetes_timeout: bool = True) -> Any:
    """Set requests, limits and (on Kubernetes) the pod's active deadline on a KFP task."""
    task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory).set_memory_limit(resources.memory_limit)
    if kubernetes_timeout:
        from kfp import kubernetes

        kubernetes.set_timeout(task, resources.timeout)
    return task


__all__ = [
    "CPU_DEFAULTS",
    "FIELDS",
    "GPU_DEFAULTS",
    "STEP_KINDS",
    "StepResources",
    "apply_resources",
    "parse_duration",
    "parse_overrides",
    "resources_for",
]
