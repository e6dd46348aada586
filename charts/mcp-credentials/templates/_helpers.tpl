{{/* The chart name, truncated to the 63 characters a label value allows. */}}
{{- define "mcp-credentials.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name, with the chart name unless it already contains it. */}}
{{- define "mcp-credentials.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "mcp-credentials.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "mcp-credentials.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select the operator's pods; never change them (Deployment selectors are immutable). */}}
{{- define "mcp-credentials.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "mcp-credentials.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "mcp-credentials.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mcp-credentials.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator image with its tag (default: the chart's appVersion). */}}
{{- define "mcp-credentials.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* The operator's --jwt-policy-file as JSON, or empty when no jwt policy value is set (then no
ConfigMap, no mount, no flag). `audiences` is left out when jwt.audiencePolicy is empty: any audience. */}}
{{- define "mcp-credentials.jwtPolicy" -}}
{{- if and .Values.jwt.enabled (or .Values.jwt.audiencePolicy .Values.jwt.unprefixedSubjects) -}}
{{- $policy := dict "unprefixedSubjects" (.Values.jwt.unprefixedSubjects | default dict) -}}
{{- if .Values.jwt.audiencePolicy -}}
{{- $_ := set $policy "audiences" .Values.jwt.audiencePolicy -}}
{{- end -}}
{{- toJson $policy -}}
{{- end -}}
{{- end -}}
