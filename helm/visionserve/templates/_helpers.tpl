{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "visionserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart> unless the release name already holds the chart name. */}}
{{- define "visionserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "visionserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "visionserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "visionserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "visionserve.labels" -}}
helm.sh/chart: {{ include "visionserve.chart" . }}
{{ include "visionserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "visionserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "visionserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image: <repository>:<tag>, the tag defaulting to <appVersion>-<flavor>. */}}
{{- define "visionserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The ConfigMap's data: user settings plus what the chart decides itself. */}}
{{- define "visionserve.configData" -}}
{{- range $k, $v := .Values.config }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
VISIONSERVE_REPOSITORY: {{ .Values.modelRepository.mountPath | quote }}
VISIONSERVE_HOST: "0.0.0.0"
VISIONSERVE_PORT: {{ .Values.containerPort | toString | quote }}
VISIONSERVE_GRACEFUL_TIMEOUT_S: {{ .Values.shutdown.drainSeconds | toString | quote }}
VISIONSERVE_MODEL_CONTROL: {{ .Values.modelRepository.control.mode | quote }}
VISIONSERVE_POLL_INTERVAL_S: {{ .Values.modelRepository.control.pollIntervalSeconds | toString | quote }}
VISIONSERVE_STRICT_READINESS: {{ .Values.modelRepository.control.strictReadiness | toString | quote }}
{{- if .Values.tensorrtCache.enabled }}
VISIONSERVE_DEFAULTS__TRT_ENGINE_CACHE: {{ .Values.tensorrtCache.mountPath | quote }}
{{- end }}
{{- end }}
