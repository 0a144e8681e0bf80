{{/* The release's name prefix for every object. */}}
{{- define "moebius.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moebius.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" . "component" "worker"). */}}
{{- define "moebius.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "moebius.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The etcd endpoints: the chart's members, or the external URL. */}}
{{- define "moebius.etcd" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := printf "%s-etcd" (include "moebius.fullname" .) -}}
{{- $scheme := include "moebius.scheme" . -}}
{{- $endpoints := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $endpoints = append $endpoints (printf "%s://%s-%d.%s:2379" $scheme $name $i $name) -}}
{{- end -}}
{{- join "," $endpoints -}}
{{- else -}}
{{- $url := required "etcd.externalUrl is required when etcd.enabled is false" .Values.etcd.externalUrl -}}
{{- if .Values.tls.enabled -}}
{{- range $endpoint := splitList "," $url -}}
{{- if not (hasPrefix "https://" $endpoint) -}}
{{- fail (printf "tls.enabled: every endpoint of etcd.externalUrl must be an https:// URL, not %s" $endpoint) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{/* http, or https with tls.enabled. */}}
{{- define "moebius.scheme" -}}
{{- ternary "https" "http" .Values.tls.enabled -}}
{{- end -}}

{{/* Refuses TLS without what it needs; renders nothing. */}}
{{- define "moebius.checkTls" -}}
{{- if and .Values.tls.clusterSecretName .Values.tls.insecureDataPlane -}}
{{- fail "tls.clusterSecretName and tls.insecureDataPlane: set one of them, not both" -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- if not .Values.tls.secretName -}}
{{- fail "tls.enabled: set tls.secretName to a Secret of type kubernetes.io/tls (tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if not (or .Values.tls.clusterSecretName .Values.tls.insecureDataPlane) -}}
{{- fail "tls.enabled: set tls.clusterSecretName to a Secret with the key cluster-secret (the workers' data-plane secret), or tls.insecureDataPlane to true" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment every part reads. */}}
{{- define "moebius.commonEnv" -}}
{{- include "moebius.checkTls" . -}}
- name: MOEBIUS_ETCD
  value: {{ include "moebius.etcd" . | quote }}
- name: MOEBIUS_CLUSTER
  value: {{ .Values.cluster | quote }}
- name: MOEBIUS_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: MOEBIUS_LOG
  value: {{ .Values.logLevel | quote }}
{{- with .Values.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: MOEBIUS_TLS_CERT
  value: /etc/moebius/tls/tls.crt
- name: MOEBIUS_TLS_KEY
  value: /etc/moebius/tls/tls.key
- name: MOEBIUS_TLS_CA
  value: /etc/moebius/tls/ca.crt
- name: MOEBIUS_TLS_SERVER_NAME
  value: {{ .Values.tls.serverName | quote }}
{{- end }}
{{- end -}}

{{/* The Secrets a part mounts: the TLS certificate (every part, with tls.enabled), the
     data-plane secret (workers) and the API keys (the router). Call with
     (dict "ctx" . "part" "worker"); "moebius.secretMounts" takes the same. */}}
{{- define "moebius.secretVolumes" -}}
{{- $v := .ctx.Values -}}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.tls.secretName }}
{{- end }}
{{- if and (eq .part "worker") $v.tls.clusterSecretName }}
- name: cluster-secret
  secret:
    secretName: {{ $v.tls.clusterSecretName }}
{{- end }}
{{- if and (eq .part "router") $v.apiKeys.secretName }}
- name: api-keys
  secret:
    secretName: {{ $v.apiKeys.secretName }}
{{- end }}
{{- end -}}

{{- define "moebius.secretMounts" -}}
{{- $v := .ctx.Values -}}
{{- if $v.tls.enabled }}
- name: tls
  mountPath: /etc/moebius/tls
  readOnly: true
{{- end }}
{{- if and (eq .part "worker") $v.tls.clusterSecretName }}
- name: cluster-secret
  mountPath: /etc/moebius/cluster-secret
  readOnly: true
{{- end }}
{{- if and (eq .part "router") $v.apiKeys.secretName }}
- name: api-keys
  mountPath: /etc/moebius/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{/* The checkpoint volume. */}}
{{- define "moebius.modelVolume" -}}
- name: model
{{- if .Values.model.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- else if .Values.model.hostPath }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- else }}
{{- fail "set model.existingClaim (a PersistentVolumeClaim) or model.hostPath to the checkpoint" }}
{{- end }}
{{- end -}}

{{- define "moebius.modelPath" -}}
{{- if .Values.model.subPath -}}
{{ .Values.model.mountPath }}/{{ .Values.model.subPath }}
{{- else -}}
{{ .Values.model.mountPath }}
{{- end -}}
{{- end -}}

{{- define "moebius.healthCommand" -}}
["moebius", "health", "--addr", "127.0.0.1:{{ .port }}", "--service", {{ .service | default "" | quote }}]
{{- end -}}

{{/* gRPC probes: liveness asks the `liveness` health service (SERVING while the process
     runs), readiness the overall status ("", the part's own readiness). Kubernetes' gRPC
     probes cannot speak TLS: with it, each probe runs `moebius health`, which reads the
     container's MOEBIUS_TLS_* variables, and has the time of that command's own timeout (2 s). */}}
{{- define "moebius.probes" -}}
{{- if .tls -}}
livenessProbe:
  exec:
    command: {{ include "moebius.healthCommand" (dict "port" .port "service" "liveness") }}
  timeoutSeconds: 3
  periodSeconds: 10
  failureThreshold: 6
readinessProbe:
  exec:
    command: {{ include "moebius.healthCommand" (dict "port" .port "service" .ready) }}
  timeoutSeconds: 3
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  exec:
    command: {{ include "moebius.healthCommand" (dict "port" .port "service" "liveness") }}
  timeoutSeconds: 3
  periodSeconds: 10
  failureThreshold: {{ .startupFailures | default 60 }}
{{- else -}}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: liveness
  periodSeconds: 10
  failureThreshold: 6
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .ready | default "" | quote }}
  periodSeconds: 5
  failureThreshold: 2
startupProbe:
  grpc:
    port: {{ .port }}
    service: liveness
  periodSeconds: 10
  failureThreshold: {{ .startupFailures | default 60 }}
{{- end }}
{{- end -}}
