{{/*
Shared helpers. Object names are fixed (not derived from the release name) because the causeway CLI finds them by
name (cli/src/clustermesh/mod.rs): the Service `clustermesh-apiserver`, identity-sync's Service `identity-sync`
(port `metrics` for /status), the ConfigMap `causeway-config` and the certificate Secrets. One release per cluster.
*/}}

{{- define "causeway.labels" -}}
app.kubernetes.io/name: causeway
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "identity-sync"). */}}
{{- define "causeway.selector" -}}
app.kubernetes.io/name: causeway
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "causeway.componentLabels" -}}
{{ include "causeway.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "causeway.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end -}}

{{/*
The cluster's name and ID, validated the way the binaries and `causeway clustermesh enable` do. Both empty/0: the
CLI sets them in the ConfigMap. "causeway.clusterName" is "" then.
*/}}
{{- define "causeway.clusterName" -}}
{{- $name := .Values.cluster.name | default "" -}}
{{- $id := int .Values.cluster.id -}}
{{- $max := int .Values.cluster.maxConnectedClusters -}}
{{- if not (or (eq $max 255) (eq $max 511)) -}}
{{- fail (printf "cluster.maxConnectedClusters must be 255 or 511, not %d" $max) -}}
{{- end -}}
{{- if and (eq $name "") (ne $id 0) -}}
{{- fail "cluster.id is set but cluster.name is not: set both, or neither (then `causeway clustermesh enable` sets them)" -}}
{{- end -}}
{{- if ne $name "" -}}
{{- if not (regexMatch "^([a-z0-9][-a-z0-9]*)?[a-z0-9]$" $name) -}}
{{- fail (printf "cluster.name %q: use a-z, 0-9 and '-', starting and ending with a letter or digit" $name) -}}
{{- end -}}
{{- if gt (len $name) 32 -}}
{{- fail (printf "cluster.name %q is longer than 32 characters" $name) -}}
{{- end -}}
{{- if eq $name "default" -}}
{{- fail "cluster.name must not be \"default\": every cluster of a mesh needs its own name" -}}
{{- end -}}
{{- if or (lt $id 1) (gt $id $max) -}}
{{- fail (printf "cluster.id must be between 1 and %d (unique in the mesh), not %d" $max $id) -}}
{{- end -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* Environment that gives a binary the cluster's name, ID and mesh size from the ConfigMap (clap's env fallbacks). */}}
{{- define "causeway.clusterEnv" -}}
- name: CAUSEWAY_CLUSTER_NAME
  valueFrom:
    configMapKeyRef:
      name: causeway-config
      key: cluster-name
- name: CAUSEWAY_CLUSTER_ID
  valueFrom:
    configMapKeyRef:
      name: causeway-config
      key: cluster-id
- name: CAUSEWAY_MAX_CONNECTED_CLUSTERS
  valueFrom:
    configMapKeyRef:
      name: causeway-config
      key: max-connected-clusters
{{- end -}}

{{/* In-cluster DNS names of the clustermesh-apiserver Service (in etcd's server certificate). */}}
{{- define "causeway.apiserverDnsNames" -}}
{{- $svc := "clustermesh-apiserver" -}}
{{- $names := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) -}}
{{- concat $names .Values.clustermesh.tls.serverCertDnsNames | toJson -}}
{{- end -}}
