"""Pure status computation: what the owned Deployment and the etcd counts say, as MidRegistrar status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .etcd import Counts
from .sidecar import SidecarCounts
from .spec import MidRegistrarSpec, Ref


@dataclass(frozen=True)
class Problem:
    """Something that makes the MidRegistrar Degraded (reason in CamelCase, message for humans)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    deployment: dict[str, Any] | None
    counts: Counts | None
    counts_source: str  # "etcd", or why counts are unknown
    problems: tuple[Problem, ...] = ()
    sidecars: SidecarCounts | None = None  # deployment sidecar: the PBX pods that opted in


def _condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    previous: dict[str, dict[str, Any]],
    now: str,
) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(type_)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else None
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
        "observedGeneration": generation,
    }


def rollout(spec: MidRegistrarSpec, deployment: dict[str, Any] | None) -> tuple[bool, bool, str, int, int]:
    """(complete, progressing, message, replicas, readyReplicas) for the owned Deployment."""
    if deployment is None:
        return False, True, "Deployment not created yet", 0, 0
    desired = int(deployment.get("spec", {}).get("replicas", spec.replicas))
    st = deployment.get("status", {}) or {}
    replicas = int(st.get("replicas", 0) or 0)
    ready = int(st.get("readyReplicas", 0) or 0)
    updated = int(st.get("updatedReplicas", 0) or 0)
    available = int(st.get("availableReplicas", 0) or 0)
    seen = int(st.get("observedGeneration", 0) or 0) >= int(
        deployment.get("metadata", {}).get("generation", 0)
    )
    if not seen:
        return False, True, "Deployment change not yet observed by its controller", replicas, ready
    complete = updated >= desired and ready >= desired and available >= desired and replicas == desired
    if complete:
        return True, False, f"{ready}/{desired} registrar pods ready", replicas, ready
    return False, True, f"{ready}/{desired} ready, {updated} updated, {replicas} pods", replicas, ready


def sidecar_rollout(counts: SidecarCounts | None) -> tuple[bool, bool, str, int, int]:
    """rollout()'s answer for a sidecar: its replicas are the PBX pods that carry it."""
    c = counts or SidecarCounts()
    message = f"{c.ready}/{c.injected} injected sidecars ready"
    if c.not_injected:
        message += f"; {c.not_injected} PBX pods without their sidecar"
    complete = c.ready == c.injected
    return complete, not complete, message, c.injected, c.ready


def compute_status(
    spec: MidRegistrarSpec,
    ref: Ref,
    observed: Observed,
    selector: str,
    previous_status: dict[str, Any] | None,
    now: str,
    config_hash: str,
) -> dict[str, Any]:
    previous = {c.get("type", ""): c for c in (previous_status or {}).get("conditions", []) or []}
    sidecar = spec.deployment == "sidecar"
    if sidecar:
        complete, progressing, message, replicas, ready = sidecar_rollout(observed.sidecars)
        desired = replicas
    else:
        complete, progressing, message, replicas, ready = rollout(spec, observed.deployment)
        desired = spec.replicas
    gen = ref.generation
    if observed.problems:
        first = observed.problems[0]
        degraded = _condition(
            "Degraded",
            True,
            first.reason,
            "; ".join(p.message for p in observed.problems),
            gen,
            previous,
            now,
        )
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problem found", gen, previous, now)
    if observed.problems:
        ready_c = _condition(
            "Ready", False, observed.problems[0].reason, degraded["message"], gen, previous, now
        )
    elif complete:
        reason = "SidecarsReady" if sidecar else "ScaledToZero" if desired == 0 else "RegistrarsReady"
        ready_c = _condition("Ready", True, reason, message, gen, previous, now)
    else:
        ready_c = _condition("Ready", False, "RollingOut", message, gen, previous, now)
    prog_c = _condition(
        "Progressing",
        progressing,
        "RollingOut" if progressing else "RolloutComplete",
        message,
        gen,
        previous,
        now,
    )
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "replicas": replicas,
        "readyReplicas": ready,
        "readyText": f"{ready}/{desired}",
        "selector": selector,
        "contacts": observed.counts.contacts if observed.counts else None,
        "aors": observed.counts.aors if observed.counts else None,
        "countsSource": observed.counts_source,
        "configHash": config_hash,
        "conditions": [ready_c, prog_c, degraded],
    }
    if sidecar:
        c = observed.sidecars or SidecarCounts()
        status["readyText"] = f"{ready}/{replicas} injected"
        status.update(injectedPods=c.injected, readyInjectedPods=c.ready, notInjectedPods=c.not_injected)
    return status


def status_differs(current: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """True when a patch would change something (lastTransitionTime kept, so a steady state is silent)."""
    current = current or {}
    return any(current.get(k) != v for k, v in new.items())
