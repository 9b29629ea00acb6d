{{/* Chart name, overridable. */}}
{{- define "kips.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: the release name, plus the chart name unless the release name contains it.
Cluster-scoped objects (ClusterRole, MutatingWebhookConfiguration) carry it too, so two
releases need two names.
*/}}
{{- define "kips.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kips.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kips.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: webhook
{{- end -}}

{{- define "kips.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kips.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kips.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kips.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret the webhook serves from: made by kips (self), cert-manager, or the user. */}}
{{- define "kips.tlsSecretName" -}}
{{- if eq .Values.certs.mode "provided" -}}
{{- .Values.certs.provided.secretName -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "kips.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* repository[:tag][@digest]; the tag defaults to the chart's appVersion. */}}
{{- define "kips.image" -}}
{{- $tag := .image.tag | default .appVersion -}}
{{- .image.repository -}}
{{- if $tag }}:{{ $tag }}{{ end -}}
{{- if .image.digest }}@{{ .image.digest }}{{ end -}}
{{- end -}}

{{/* Whether the webhook runs in the cluster (false: webhook.url points elsewhere). */}}
{{- define "kips.inCluster" -}}
{{- if not .Values.webhook.url }}true{{ end -}}
{{- end -}}

{{/* Cross-field checks the schema cannot express, with messages that say what to do. */}}
{{- define "kips.validate" -}}
{{- if and (eq .Values.certs.mode "provided") (include "kips.inCluster" .) -}}
{{- if not .Values.certs.provided.secretName -}}
{{- fail "certs.mode=provided needs certs.provided.secretName: the kubernetes.io/tls Secret (tls.crt, tls.key) in the release namespace that the webhook serves" -}}
{{- end -}}
{{- if not .Values.webhook.caBundle -}}
{{- fail "certs.mode=provided needs webhook.caBundle: the PEM CA that signed the Secret's certificate (e.g. --set-file webhook.caBundle=ca.crt)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.webhook.caBundle (include "kips.inCluster" .) (ne .Values.certs.mode "provided") -}}
{{- fail (printf "webhook.caBundle is set but certs.mode=%s manages the caBundle itself; set it only with certs.mode=provided or webhook.url" .Values.certs.mode) -}}
{{- end -}}
{{- $needed := add .Values.webhook.shutdownDelaySeconds .Values.webhook.drainTimeoutSeconds -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed webhook.shutdownDelaySeconds + webhook.drainTimeoutSeconds (%d), or the kubelet kills kips mid-drain" (int .Values.terminationGracePeriodSeconds) (int $needed)) -}}
{{- end -}}
{{- end -}}

{{/* Where the API server sends reviews: the Service, or webhook.url. */}}
{{- define "kips.clientConfig" -}}
{{- if .Values.webhook.url }}
url: {{ .Values.webhook.url | quote }}
{{- else }}
service:
  name: {{ include "kips.fullname" . }}
  namespace: {{ .Release.Namespace }}
  path: /mutate
  port: 443
{{- end }}
{{- with .Values.webhook.caBundle }}
caBundle: {{ . | b64enc }}
{{- end }}
{{- end -}}

{{/* Never kube-system, kube-node-lease or the release namespace (kips must not block itself). */}}
{{- define "kips.namespaceSelector" -}}
matchExpressions:
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- range (concat (list "kube-system" "kube-node-lease" .Release.Namespace) .Values.webhook.excludeNamespaces | uniq) }}
      - {{ . }}
      {{- end }}
{{- end -}}
