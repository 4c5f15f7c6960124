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
{{- if .Values.service.agentsHeadless.enabled -}}
{{- $agents := include "tapgraph.agentsServiceHost" . -}}
{{- $names = concat $names (list $agents (printf "%s.cluster.local" $agents)) -}}
{{- end -}}
{{- concat $names .Values.controller.extraServerNames | uniq | join "," -}}
{{- end -}}

{{/* The headless Service for agents (service.agentsHeadless): one DNS name, every ready replica. */}}
{{- define "tapgraph.agentsServiceHost" -}}
{{- printf "%s-agents.%s.svc" (include "tapgraph.fullname" .) .Release.Namespace -}}
{{- end -}}

{{- define "tapgraph.agentControllerAddress" -}}
{{- $host := include "tapgraph.serviceHost" . -}}
{{- if .Values.service.agentsHeadless.enabled -}}
{{- $host = include "tapgraph.agentsServiceHost" . -}}
{{- end -}}
{{- default (printf "%s:%v" $host .Values.service.grpcPort) .Values.agent.controllerAddress -}}
{{- end -}}

{{/* "true" when the controller keeps its state in PostgreSQL (store.backend=postgres). */}}
{{- define "tapgraph.postgres" -}}
{{- if eq .Values.store.backend "postgres" -}}true{{- end -}}
{{- end -}}

{{/* More than one controller needs PostgreSQL and one CA for all: values.schema.json refuses it
     otherwise; this says so again for an install run with --skip-schema-validation. */}}
{{- define "tapgraph.checkReplicas" -}}
{{- if gt (int .Values.controller.replicas) 1 -}}
{{- if ne .Values.store.backend "postgres" -}}
{{- fail (printf "controller.replicas=%v needs store.backend=postgres: the embedded store is one controller's file (set store.backend, store.postgres.url and store.postgres.passwordSecret, or controller.replicas=1)" .Values.controller.replicas) -}}
{{- end -}}
{{- if not .Values.pki.existingCASecret -}}
{{- fail (printf "controller.replicas=%v needs pki.existingCASecret: every replica must sign with the same CA (a kubernetes.io/tls Secret with tls.crt and tls.key)" .Values.controller.replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}
