{{/* Names and labels shared by the templates. */}}
{{- define "midreg.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "midreg.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "midreg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "midreg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "midreg.labels" -}}
{{ include "midreg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kube-midregistrar
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "midreg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "midreg.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "midreg.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's namespaced rules: exactly those of operator/deploy/rbac.yaml (tests/cluster/test_chart.py
compares them). Without watchNamespaces they go into the ClusterRole; with them, into a Role per namespace.
*/}}
{{- define "midreg.namespacedRules" -}}
# The MidRegistrar resources: watch, annotate (kopf progress, finalizer), write status.
- apiGroups: [sip.midregistrar.io]
  resources: [midregistrars]
  verbs: [get, list, watch, patch, update]
- apiGroups: [sip.midregistrar.io]
  resources: [midregistrars/status]
  verbs: [get, patch, update]
# Owner references with blockOwnerDeletion need update on the owner's finalizers subresource.
- apiGroups: [sip.midregistrar.io]
  resources: [midregistrars/finalizers]
  verbs: [update]
# Owned objects: server-side apply. No delete: garbage collection removes them with their MidRegistrar.
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts]
  verbs: [get, list, watch, create, patch, update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, update]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, update]
# Sidecar mode: the PBX pods that opted in (status counts; one created without its sidecar gets an event).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# The HPA is also removed when spec.autoscaling is turned off.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, update, delete]
# The NetworkPolicy is also removed when spec.networkPolicy.enabled is turned off.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, update, delete]
# The etcd credentials Secret named by spec.etcd.secretName (read one by name; never list), and the
# pods' hand-off keys, a Secret the operator makes and rotates (create, update; never list).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, update]
# kopf reports handler outcomes as events.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if include "midreg.peering" . }}
# Peering (replicas > 1): keep-alives in the namespace's KopfPeering (namespaced operators).
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}

{{/* Cluster-level reads kopf needs in every scope: resource discovery (CRDs) and namespaces. */}}
{{- define "midreg.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
# Sidecar mode: the injection webhook's configuration, one entry per sidecar MidRegistrar of any namespace.
- apiGroups: [admissionregistration.k8s.io]
  resources: [mutatingwebhookconfigurations]
  verbs: [get, list, watch, create, patch, update]
- apiGroups: [sip.midregistrar.io]
  resources: [midregistrars]
  verbs: [list]
{{- if and (include "midreg.peering" .) (not .Values.watchNamespaces) }}
# Peering (replicas > 1): keep-alives in the ClusterKopfPeering (cluster-wide operators).
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}

{{/* Non-empty when the operator replicas peer (active/standby): peering.enabled or replicas > 1. */}}
{{- define "midreg.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{- define "midreg.peeringName" -}}
{{- default (include "midreg.fullname" .) .Values.peering.name -}}
{{- end -}}
