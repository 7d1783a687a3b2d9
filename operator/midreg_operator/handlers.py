"""kopf handlers: thin glue between the API server and the pure renderers.

Level-based: every handler runs the same `reconcile` (render everything, server-side apply it, compute
status). create/update/resume only make convergence faster; the timer repairs drift on its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kopf

from . import handoff_keys, render, sidecar
from .etcd import EtcdGateway, EtcdUnavailable
from .kube import Kube, KubeError
from .spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, MidRegistrarSpec, Ref, etcd_prefix, parse_spec
from .status import Observed, Problem, compute_status, status_differs
from .webhook import Certificates, ServingContext, WebhookSettings, issue, renewal_reason

RESYNC_SECONDS = float(os.environ.get("MIDREG_OPERATOR_RESYNC_SECONDS", "30"))
RETRY_SECONDS = float(os.environ.get("MIDREG_OPERATOR_RETRY_SECONDS", "10"))
# Seconds between the steps of a hand-off key rotation: the kubelet updates a mounted Secret within about a
# minute and the registrar re-reads its key file every 10 s.
HANDOFF_SETTLE_SECONDS = float(os.environ.get("MIDREG_HANDOFF_SETTLE_SECONDS", "120"))
# How often the webhook's certificate is checked (and reloaded when another replica renewed it).
CERT_CHECK_SECONDS = float(os.environ.get("MIDREG_WEBHOOK_CERT_CHECK_SECONDS", "600"))
WATCH_SERVER_TIMEOUT = int(os.environ.get("MIDREG_OPERATOR_WATCH_SERVER_TIMEOUT", "300"))
WATCH_CLIENT_TIMEOUT = int(
    os.environ.get("MIDREG_OPERATOR_WATCH_CLIENT_TIMEOUT", str(WATCH_SERVER_TIMEOUT + 60))
)
FINALIZER = "sip.midregistrar.io/etcd-cleanup"
SKIP_CLEANUP_ANNOTATION = "sip.midregistrar.io/skip-etcd-cleanup"
ANNOTATION_PREFIX = "operator.sip.midregistrar.io"

Logger = logging.Logger | logging.LoggerAdapter[Any]
_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube.from_environment()
    return _kube


def reset_client() -> None:
    """Forget the API client (tests start operators with different identities in one process)."""
    global _kube
    _kube = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Webhook:
    """The sidecar injection webhook of this operator process (kept in kopf's memo)."""

    settings: WebhookSettings
    serving: ServingContext
    ca: bytes
    task: asyncio.Task[None] | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    reset_client()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Watches that hang silently are a known kopf failure mode: bound them on both sides.
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = int(os.environ.get("MIDREG_OPERATOR_WORKERS", "8"))
    web = WebhookSettings.from_environment()
    if web is not None:
        certs = ensure_certificates(web, logger)
        serving = ServingContext(certs)
        memo.webhook = Webhook(web, serving, certs.ca_crt)
        # Served by kopf; the webhook configuration is the operator's own (one entry per sidecar
        # MidRegistrar, each with its failure policy), so kopf does not manage one.
        settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0",
            port=web.port,
            context=serving.context,
            cadata=certs.ca_crt,
            certfile=str(serving.certfile),
            pkeyfile=str(serving.keyfile),
        )
        settings.admission.managed = None
        sync_webhook_configuration(memo.webhook)


@kopf.on.startup()
async def start_certificate_upkeep(memo: kopf.Memo, logger: Logger, **_: Any) -> None:
    webhook: Webhook | None = getattr(memo, "webhook", None)
    if webhook is not None:
        webhook.task = asyncio.create_task(_certificate_upkeep(webhook, logger))


@kopf.on.cleanup()
async def stop_certificate_upkeep(memo: kopf.Memo, **_: Any) -> None:
    webhook: Webhook | None = getattr(memo, "webhook", None)
    if webhook is not None and webhook.task is not None:
        webhook.task.cancel()


async def _certificate_upkeep(webhook: Webhook, logger: Logger) -> None:
    """Renew the serving certificate before it expires (any replica may), and load the one in the Secret
    when it is not the one served (another replica renewed it)."""
    while True:
        await asyncio.sleep(CERT_CHECK_SECONDS)
        try:
            certs = await asyncio.to_thread(ensure_certificates, webhook.settings, logger)
        except KubeError as exc:
            logger.warning(f"webhook certificate check failed: {exc}")
            continue
        if certs.tls_crt != webhook.serving.serving:
            webhook.serving.load(certs)
            logger.info("webhook: serving the renewed certificate")
        if certs.ca_crt != webhook.ca:
            webhook.ca = certs.ca_crt
            await asyncio.to_thread(sync_webhook_configuration, webhook)


def ensure_certificates(web: WebhookSettings, logger: Logger) -> Certificates:
    """The webhook's certificates from their Secret, made or renewed first when they must be (expired,
    expiring, other hosts). Replicas race benignly: a 409 means another one wrote first; its copy is used."""
    k = kube()
    secret = k.get("v1", "Secret", web.namespace, web.secret)
    current = Certificates.from_secret_data(dict(secret.get("data") or {})) if secret else None
    reason = "none yet" if current is None else renewal_reason(current, web.hosts)
    if current is not None and reason is None:
        return current
    keep_ca = current is not None and reason not in ("the CA has expired", "not signed by the CA")
    fresh = issue(web.hosts, ca=(current.ca_crt, current.ca_key) if current is not None and keep_ca else None)
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": web.secret,
            "namespace": web.namespace,
            "labels": {"app.kubernetes.io/managed-by": render.MANAGED_BY},
        },
        "data": fresh.to_secret_data(),
    }
    try:
        if secret is None:
            k.create(obj)
        else:
            obj["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
            k.replace(obj)
    except KubeError as exc:
        if exc.status != 409:
            raise
        return ensure_certificates(web, logger)  # another replica wrote first: use (or check) its copy
    logger.info(f"webhook certificate for {', '.join(web.hosts)} issued ({reason})")
    return fresh


def sync_webhook_configuration(webhook: Webhook) -> None:
    """The MutatingWebhookConfiguration with one entry per sidecar MidRegistrar (none: an empty list)."""
    k = kube()
    entries = []
    for mr in k.list(API_VERSION, KIND, None):
        meta = mr.get("metadata") or {}
        spec = parse_spec(mr.get("spec"))
        if spec.deployment == "sidecar" and not meta.get("deletionTimestamp"):
            entries.append((_ref(meta, meta.get("namespace", ""), meta.get("name", "")), spec))
    k.apply(sidecar.webhook_configuration(entries, webhook.settings.client_config(webhook.ca)))


@kopf.on.mutate(
    "v1", "pods", id=sidecar.WEBHOOK_PATH, operations={"CREATE"}, labels={sidecar.SIDECAR_LABEL: kopf.PRESENT}
)
async def inject_sidecar(
    *,
    body: kopf.Body,
    patch: kopf.Patch,
    namespace: str | None,
    warnings: list[str],
    logger: Logger,
    **_: Any,
) -> None:
    """Add the registrar container to a PBX pod that names a sidecar MidRegistrar in its label.

    Asynchronous, with its one read in a thread of its own: kopf runs synchronous handlers on the workers that
    reconciliation uses, and the API server gives admission 10 s. Queued behind reconciles that wait on an
    unreachable etcd, the pod was refused (Fail) or created plain (Ignore)."""
    name = body.metadata.labels.get(sidecar.SIDECAR_LABEL, "")
    ns = namespace or body.metadata.namespace or ""
    mr = await asyncio.to_thread(kube().get, API_VERSION, KIND, ns, name)
    spec = parse_spec(mr.get("spec")) if mr is not None else None
    if mr is None or spec is None or spec.deployment != "sidecar":
        warnings.append(f"no sidecar MidRegistrar {ns}/{name}: pod created without a mid-registrar")
        return
    ref = _ref(mr["metadata"], ns, name)
    change = sidecar.injection(spec, ref, dict(body))
    if change is None:
        return  # already injected (a re-admission)
    patch.update(change)
    logger.info(f"injected the {name} mid-registrar sidecar")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the ServiceAccount token; elsewhere: $KUBECONFIG as it is when the operator starts."""
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
        **kwargs
    ) or kopf.login_with_kubeconfig(**kwargs)
    return info


def _ref(meta: Any, namespace: str, name: str) -> Ref:
    return Ref(
        name=name,
        namespace=namespace,
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 0) or 0),
    )


def _secret(spec: MidRegistrarSpec, namespace: str) -> tuple[dict[str, str] | None, Problem | None]:
    """The etcd credentials Secret's decoded data; a Problem (not an exception) when it is missing."""
    if not spec.etcd.secret_name:
        return {}, None
    secret = kube().get("v1", "Secret", namespace, spec.etcd.secret_name)
    if secret is None:
        return None, Problem(
            "SecretNotFound",
            f"etcd Secret {namespace}/{spec.etcd.secret_name} (spec.etcd.secretName) does not exist",
        )
    data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}
    return data, None


@contextlib.contextmanager
def gateway(spec: MidRegistrarSpec, creds: dict[str, str] | None) -> Iterator[EtcdGateway]:
    creds = creds or {}
    with tempfile.TemporaryDirectory(prefix="midreg-etcd-") as tmp:
        cert_file = key_file = None
        if creds.get("tls.crt") and creds.get("tls.key"):
            cert_file, key_file = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
            for path, key in ((cert_file, "tls.crt"), (key_file, "tls.key")):
                with open(path, "w", opener=lambda p, f: os.open(p, f, 0o600)) as fh:
                    fh.write(creds[key])
        yield EtcdGateway(
            endpoints=list(spec.etcd.endpoints),
            ca_data=creds.get("ca.crt"),
            cert_file=cert_file,
            key_file=key_file,
            username=creds.get("username"),
            password=creds.get("password"),
        )


def observe_counts(
    spec: MidRegistrarSpec, ref: Ref, creds: dict[str, str] | None
) -> tuple[Any, str, Problem | None]:
    if not spec.etcd.endpoints:
        return None, "unknown: in-memory store (per-pod state, no shared count)", None
    with gateway(spec, creds) as gw:
        try:
            counts = gw.counts(etcd_prefix(spec, ref))
        except EtcdUnavailable as exc:
            return None, "unknown: etcd unreachable", Problem("EtcdUnreachable", f"etcd unreachable: {exc}")
    if counts is None:
        return None, "unknown: too many keys to count", None
    return counts, "etcd", None


def reconcile(
    spec_raw: Any, meta: Any, status: Any, namespace: str, name: str, logger: logging.Logger | Any
) -> dict[str, Any]:
    """Render, apply, observe; returns the status to write (the caller decides whether it changed)."""
    spec = parse_spec(spec_raw)
    ref = _ref(meta, namespace, name)
    k = kube()
    problems: list[Problem] = []
    creds, problem = _secret(spec, namespace)
    if problem:
        problems.append(problem)
    try:
        if spec.etcd.endpoints:
            keep_handoff_keys(spec, ref, meta, logger)  # before the pods that mount them
        for obj in render.render_all(spec, ref):
            k.apply(obj)
        for api_version, kind, obj_name in render.absent_objects(spec, ref):
            existing = k.get(api_version, kind, namespace, obj_name)
            if existing is None or not render.owned_by(existing, ref):
                continue  # gone already, or a namesake that is not ours
            if k.delete(api_version, kind, namespace, obj_name, uid=existing["metadata"]["uid"]):
                logger.info(f"deleted {kind} {obj_name}: no longer wanted by the spec")
    except KubeError as exc:
        current = dict(status or {})
        failed = compute_status(
            spec,
            ref,
            Observed(None, None, "unknown", (Problem("ApplyFailed", str(exc)),)),
            render.selector_string(ref),
            current,
            _now(),
            render.config_hash(spec, ref),
        )
        with contextlib.suppress(KubeError):
            k.patch_status(namespace, name, failed)
        raise kopf.TemporaryError(f"applying owned objects failed: {exc}", delay=RETRY_SECONDS) from exc
    if spec.deployment == "sidecar":
        return observe_sidecars(spec, ref, status, creds, problems, logger)
    deployment = k.get("apps/v1", "Deployment", namespace, render.names(ref)["deployment"])
    return observe(spec, ref, status, deployment, creds, problems)


def keep_handoff_keys(spec: MidRegistrarSpec, ref: Ref, meta: Any, logger: Logger) -> None:
    """The pods' hand-off keys: made once, then stepped through a rotation when the MidRegistrar asks for one
    (:mod:`.handoff_keys`). Never overwritten otherwise: the pods hold it."""
    k = kube()
    name = render.names(ref)["handoff"]
    secret = k.get("v1", "Secret", ref.namespace, name)
    requested = (meta.get("annotations") or {}).get(handoff_keys.ROTATE_ANNOTATION, "")
    now = datetime.datetime.now(datetime.UTC).timestamp()
    if secret is None:
        state: handoff_keys.KeyState | None = handoff_keys.initial(now)
        current = None
    else:
        data = {
            key: base64.b64decode(v).decode(errors="replace") for key, v in (secret.get("data") or {}).items()
        }
        current = handoff_keys.KeyState.from_secret(data, dict(secret["metadata"].get("annotations") or {}))
        state = handoff_keys.next_state(current, requested, now, HANDOFF_SETTLE_SECONDS)
    if state is None:
        return
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": ref.namespace,
            "labels": render.labels(ref),
            "annotations": state.annotations(),
            "ownerReferences": [render.owner_reference(ref)],
        },
        "data": {handoff_keys.KEY_FILE: base64.b64encode(state.file().encode()).decode()},
    }
    if secret is None:
        k.create(obj)
        logger.info(f"hand-off keys made in Secret {name}")
        return
    obj["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
    k.replace(obj)  # a 409 (another writer) raises: the next reconcile starts from the new state
    step = {
        "added": "new key added (accepted, not used yet)",
        "promoted": "new key in use",
        "": "old key dropped",
    }
    logger.info(f"hand-off key rotation {state.rotation!r}: {step.get(state.phase, state.phase)}")


def observe_sidecars(
    spec: MidRegistrarSpec,
    ref: Ref,
    status: Any,
    creds: dict[str, str] | None,
    problems: list[Problem],
    logger: Logger,
) -> dict[str, Any]:
    """A sidecar's status: the PBX pods that carry it. A pod that opted in and came up without it (the
    webhook was unreachable, failurePolicy Ignore) gets a Warning event and makes the MidRegistrar
    Degraded until it is replaced."""
    pods = kube().list("v1", "Pod", ref.namespace, f"{sidecar.SIDECAR_LABEL}={ref.name}")
    counts = sidecar.count_pods(pods)
    missing = [p for p in pods if not sidecar.injected(p) and not p["metadata"].get("deletionTimestamp")]
    for pod in missing:
        kopf.warn(
            kopf.Body(typing.cast(kopf.RawBody, pod)),
            reason="SidecarNotInjected",
            message=f"created without the {ref.name} mid-registrar sidecar (the injection webhook was not "
            "reached and failurePolicy is Ignore): delete the pod to have it injected",
        )
    if missing:
        names_ = ", ".join(p["metadata"]["name"] for p in missing[:5])
        problems.append(
            Problem("SidecarNotInjected", f"{len(missing)} PBX pods without their sidecar: {names_}")
        )
    return observe(spec, ref, status, None, creds, problems, sidecars=counts)


def observe(
    spec: MidRegistrarSpec,
    ref: Ref,
    status: Any,
    deployment: dict[str, Any] | None,
    creds: dict[str, str] | None,
    problems: list[Problem],
    sidecars: sidecar.SidecarCounts | None = None,
) -> dict[str, Any]:
    """The status that the Deployment (or the injected PBX pods), the etcd counts and the problems found so
    far add up to."""
    counts, source, problem = observe_counts(spec, ref, creds)
    if problem:
        problems.append(problem)
    return compute_status(
        spec,
        ref,
        Observed(deployment, counts, source, tuple(problems), sidecars),
        render.selector_string(ref),
        dict(status or {}),
        _now(),
        render.config_hash(spec, ref),
    )


def _converge(
    spec: Any, meta: Any, status: Any, namespace: str, name: str, patch: Any, logger: Any, memo: Any = None
) -> None:
    new = reconcile(spec, meta, status, namespace, name, logger)
    if status_differs(dict(status or {}), new):
        patch.status.update(new)
    webhook: Webhook | None = getattr(memo, "webhook", None)
    if webhook is not None and parse_spec(spec).deployment == "sidecar":
        sync_webhook_configuration(webhook)


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=RETRY_SECONDS)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=RETRY_SECONDS)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=RETRY_SECONDS)
def converge(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    namespace: str | None,
    name: str,
    patch: kopf.Patch,
    logger: Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    _converge(spec, meta, status, namespace or "", name, patch, logger, memo)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS / 2)
def resync(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    namespace: str | None,
    name: str,
    patch: kopf.Patch,
    logger: Logger,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    _converge(spec, meta, status, namespace or "", name, patch, logger, memo)


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": render.MANAGED_BY})
def deployment_changed(
    *, event: kopf.RawEvent, body: kopf.Body, namespace: str | None, logger: Logger, **_: Any
) -> None:
    """Accelerator: a registrar Deployment's status changed, so refresh its MidRegistrar's status now
    (the timer would do it too, later). Stateless: nothing is written to the Deployment."""
    if event.get("type") == "DELETED" or not namespace:
        return  # the timer re-creates it
    owner = next(
        (
            o
            for o in body.get("metadata", {}).get("ownerReferences", [])
            if o.get("kind") == KIND and o.get("apiVersion") == API_VERSION and o.get("controller")
        ),
        None,
    )
    if owner is None:
        return
    k = kube()
    mr = k.get(API_VERSION, KIND, namespace, owner["name"])
    if mr is None or mr["metadata"].get("deletionTimestamp") or mr["metadata"].get("uid") != owner.get("uid"):
        return
    spec = parse_spec(mr.get("spec"))
    current = dict(mr.get("status") or {})
    if not current.get("observedGeneration"):
        return  # converge() has not reported on any generation yet: Ready now would claim an unseen spec
    # Only converge() applies a generation: keep the generation it last applied, not the newest one.
    ref = _ref(mr["metadata"], namespace, owner["name"]).model_copy(
        update={"generation": int(current.get("observedGeneration", 0) or 0)}
    )
    creds, problem = _secret(spec, namespace)
    new = observe(spec, ref, current, dict(body), creds, [problem] if problem else [])
    if status_differs(current, new):
        k.patch_status(namespace, owner["name"], new)


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=RETRY_SECONDS)
def cleanup(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    namespace: str | None,
    name: str,
    logger: Logger,
    **_: Any,
) -> None:
    """Finalizer: remove the MidRegistrar's etcd prefix. Owned objects go by garbage collection."""
    namespace = namespace or ""
    parsed = parse_spec(spec)
    ref = _ref(meta, namespace, name)
    if not parsed.etcd.endpoints:
        logger.info("in-memory store: no etcd prefix to remove")
        return
    prefix = etcd_prefix(parsed, ref)
    if (meta.get("annotations") or {}).get(SKIP_CLEANUP_ANNOTATION) == "true":
        logger.warning(f"etcd prefix {prefix} left in place ({SKIP_CLEANUP_ANNOTATION}=true)")
        return
    creds, _problem = _secret(parsed, namespace)
    with gateway(parsed, creds) as gw:
        try:
            deleted = gw.delete_prefix(prefix)
        except EtcdUnavailable as exc:
            message = (
                f"etcd prefix {prefix} not removed yet, etcd unreachable ({exc}); retrying every "
                f"{RETRY_SECONDS:g}s (annotate {SKIP_CLEANUP_ANNOTATION}=true to give up)"
            )
            conditions = [
                c for c in (dict(status or {}).get("conditions") or []) if c.get("type") != "Degraded"
            ]
            conditions.append(
                {
                    "type": "Degraded",
                    "status": "True",
                    "reason": "EtcdCleanupPending",
                    "message": message,
                    "lastTransitionTime": _now(),
                    "observedGeneration": ref.generation,
                }
            )
            with contextlib.suppress(KubeError):
                kube().patch_status(namespace, name, {"conditions": conditions})
            raise kopf.TemporaryError(message, delay=RETRY_SECONDS) from exc
    logger.info(f"removed etcd prefix {prefix} ({deleted} keys)")


@kopf.on.delete(GROUP, VERSION, PLURAL, id="webhook-entry", backoff=RETRY_SECONDS)
def drop_webhook_entry(*, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """A sidecar MidRegistrar that goes takes its webhook entry with it (its pods are created plain)."""
    webhook: Webhook | None = getattr(memo, "webhook", None)
    if webhook is not None and parse_spec(spec).deployment == "sidecar":
        sync_webhook_configuration(webhook)
