{{/* The release's base name: the release name when it already says lorafleet, else <release>-lorafleet. */}}
{{- define "lorafleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.operatorName" -}}
{{- printf "%s-operator" (include "lorafleet.fullname" .) -}}
{{- end -}}

{{- define "lorafleet.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "lorafleet.operatorName" .) -}}
{{- end -}}

{{/* What selects the operator's pod: the same keys as manifests/, plus the release. */}}
{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: lorafleet
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lorafleet.labels" -}}
app.kubernetes.io/part-of: lorafleet
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "lorafleet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* What the operator does inside the namespaces it watches (manifests/rbac.yaml, in the same order). */}}
{{- define "lorafleet.namespacedRules" -}}
# Its own resources.
- apiGroups: [lorafleet.io]
  resources: [basemodels, adapters, tenants]
  verbs: [get, list, watch, patch, update]
- apiGroups: [lorafleet.io]
  resources: [basemodels/status, adapters/status, tenants/status]
  verbs: [get, patch, update]
# What a BaseModel becomes.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, update, patch]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [get, list, watch, create, update, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, update, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, update, patch]
# Each fleet's replica NetworkPolicy (only its gateways, the operator and the scraper reach replica pods).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, update, patch]
# Each fleet's admin token (made once, read to call the replicas' admin routes), its gateways' tenant policy, and the
# Secrets Tenants name (read every --tenant-key-poll-s); never listed or watched.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, update, patch]
# The gateway's Role grants these, so the operator must hold them too.
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
# Where adapters are hot: the replica pods.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# kopf: events for every decision.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* Cluster-scoped reads kopf needs to discover the resources it serves, wherever it watches. */}}
{{- define "lorafleet.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end -}}
