{{/* Resource names: RELEASE-tapgraph, or RELEASE when it already says tapgraph. */}}
{{- define "tapgraph.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tapgraph.fullname" -}}
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

{{- define "tapgraph.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tapgraph.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tapgraph
{{- end -}}

{{/* Selector labels; call with (dict "ctx" . "component" "controller"). */}}
{{- define "tapgraph.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tapgraph.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tapgraph.controllerImage" -}}
{{- printf "%s:%s" .Values.image.controller.repository (default .Chart.AppVersion .Values.image.controller.tag) -}}
{{- end -}}

{{- define "tapgraph.agentImage" -}}
{{- printf "%s:%s" .Values.image.agent.repository (default .Chart.AppVersion .Values.image.agent.tag) -}}
{{- end -}}

{{/* The controller Service's in-cluster DNS name. */}}
{{- define "tapgraph.serviceHost" -}}
{{- printf "%s.%s.svc" (include "tapgraph.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* Names on the controller's serving certificate: the Service's, localhost (for
     `kubectl port-forward`), and the operator's extras. */}}
{{- define "tapgraph.serverNames" -}}
{{- $full := include "tapgraph.fullname" . -}}
{{- $names := list $full (printf "%s.%s" $full .Release.Namespace) (include "tapgraph.serviceHost" .) (printf "%s.cluster.local" (include "tapgraph.serviceHost" .)) "localhost" "127.0.0.1" -}}
{{- concat $names .Values.controller.extraServerNames | uniq | join "," -}}
{{- end -}}

{{- define "tapgraph.agentControllerAddress" -}}
{{- default (printf "%s:%v" (include "tapgraph.serviceHost" .) .Values.service.grpcPort) .Values.agent.controllerAddress -}}
{{- end -}}
