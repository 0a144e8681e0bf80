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
{{- $endpoints := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $endpoints = append $endpoints (printf "http://%s-%d.%s:2379" $name $i $name) -}}
{{- end -}}
{{- join "," $endpoints -}}
{{- else -}}
{{- required "etcd.externalUrl is required when etcd.enabled is false" .Values.etcd.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Environment every part reads. */}}
{{- define "moebius.commonEnv" -}}
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

{{/* gRPC probes: liveness asks the `liveness` health service (SERVING while the process
     runs), readiness the overall status ("", the part's own readiness). */}}
{{- define "moebius.probes" -}}
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
{{- end -}}
