{{/* Chart name, or nameOverride. */}}
{{- define "router-grpc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name. With the release named like the chart (`helm install router-grpc ...`) it is just
router-grpc, the Service name the seed README's addresses use.
*/}}
{{- define "router-grpc.fullname" -}}
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

{{- define "router-grpc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: immutable on a Deployment, so only the stable ones. `app` is there because
operators' commands (kubectl ... -l app=router-grpc) select by it.
*/}}
{{- define "router-grpc.selectorLabels" -}}
app: {{ include "router-grpc.name" . }}
app.kubernetes.io/name: {{ include "router-grpc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "router-grpc.labels" -}}
{{ include "router-grpc.selectorLabels" . }}
helm.sh/chart: {{ include "router-grpc.chart" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
