{{/* Names and labels. */}}
{{- define "radai.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "radai.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "radai.selectorLabels" -}}
app.kubernetes.io/name: {{ include "radai.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "radai.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "radai.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "radai.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "radai.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The roles whose pods receive DICOM and serve the API: "all" embedded, "receiver" in scale-out mode. */}}
{{- define "radai.frontRole" -}}
{{- if .Values.scaleout.enabled }}receiver{{ else }}all{{ end -}}
{{- end -}}

{{- define "radai.image" -}}
{{- $root := .root -}}
{{- if gt (int .gpu) 0 -}}
{{- printf "%s:%s" $root.Values.image.repository (default (printf "%s-cuda" $root.Chart.AppVersion) $root.Values.image.cudaTag) -}}
{{- else -}}
{{- printf "%s:%s" $root.Values.image.repository (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "radai.claimName" -}}
{{- default (printf "%s-data" (include "radai.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{- define "radai.apiSecretName" -}}
{{- default (printf "%s-api" (include "radai.fullname" .)) .Values.api.existingSecret -}}
{{- end -}}

{{- define "radai.scaleoutSecretName" -}}
{{- printf "%s-scaleout" (include "radai.fullname" .) -}}
{{- end -}}

{{- define "radai.urlSecretName" -}}
{{- default (include "radai.scaleoutSecretName" .) .Values.scaleout.existingSecret -}}
{{- end -}}

{{- define "radai.streamPrefix" -}}
{{- dig "scaleout" "stream_prefix" "radai" .Values.config -}}
{{- end -}}

{{/*
A secret value: the one given, else the one already stored in the Secret (kept across upgrades), else a new
random one. Arguments: root, secret (name), key, value.
*/}}
{{- define "radai.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- $stored := "" -}}
{{- if $existing -}}
{{- if $existing.data -}}
{{- $stored = index $existing.data .key | default "" | b64dec -}}
{{- end -}}
{{- end -}}
{{- default (randAlphaNum 32) $stored -}}
{{- end -}}
{{- end -}}

{{/* The restricted Pod Security Standard, for every radai container. */}}
{{- define "radai.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "radai.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Checks that fail the render with a clear message. */}}
{{- define "radai.validate" -}}
{{- if .Values.scaleout.enabled -}}
{{- if not .Values.scaleout.existingSecret -}}
{{- if and (not .Values.scaleout.databaseUrl) (not .Values.postgresql.enabled) -}}
{{- fail "scaleout.enabled needs PostgreSQL: scaleout.databaseUrl, scaleout.existingSecret or postgresql.enabled" -}}
{{- end -}}
{{- if and (not .Values.scaleout.redisUrl) (not .Values.redis.enabled) -}}
{{- fail "scaleout.enabled needs Redis: scaleout.redisUrl, scaleout.existingSecret or redis.enabled" -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.persistence.existingClaim) (eq (default "ReadWriteMany" .Values.persistence.accessMode) "ReadWriteOnce") -}}
{{- fail "scaleout.enabled shares the data dir between pods: persistence.accessMode must be ReadWriteMany" -}}
{{- end -}}
{{- else -}}
{{- if or .Values.postgresql.enabled .Values.redis.enabled -}}
{{- fail "postgresql.enabled and redis.enabled are for scale-out mode (scaleout.enabled: true)" -}}
{{- end -}}
{{- end -}}
{{- if and (include "radai.kedaEnabled" .) (not .Values.worker.autoscaling.redis.address) (not .Values.redis.enabled) -}}
{{- fail "worker.autoscaling (KEDA) with an external Redis needs worker.autoscaling.redis.address (host:port)" -}}
{{- end -}}
{{- if and .Values.dicom.tls.enabled (not .Values.dicom.tls.secretName) -}}
{{- fail "dicom.tls.enabled needs dicom.tls.secretName (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- end -}}

{{/* "true" when the workers' KEDA ScaledObject is rendered, else empty. */}}
{{- define "radai.kedaEnabled" -}}
{{- if and .Values.scaleout.enabled .Values.worker.autoscaling.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") -}}
true
{{- end -}}
{{- end -}}
