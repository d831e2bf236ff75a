{{/*
The chart name, shortened to the 63 characters a Kubernetes name may have.
*/}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: `<release>-<chart>`, or just the release name when it
already contains the chart name (`helm install tollgate ...` gives `tollgate`).
*/}}
{{- define "tollgate.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "tollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource, without the component.
*/}}
{{- define "tollgate.commonLabels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tollgate
{{- end }}

{{/*
Labels on the data plane's resources.
*/}}
{{- define "tollgate.labels" -}}
{{ include "tollgate.commonLabels" . }}
app.kubernetes.io/component: dataplane
{{- end }}

{{/*
Labels that select the data-plane pods. They never change across upgrades (a Deployment's
selector is immutable).
*/}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: dataplane
{{- end }}

{{/*
Name of the Secret holding the manifests: the user's, or the one this chart renders.
*/}}
{{- define "tollgate.manifestsSecretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- printf "%s-manifests" (include "tollgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
The data-plane image.
*/}}
{{- define "tollgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The deployment mode, checked: `standalone` or `cluster`.
*/}}
{{- define "tollgate.mode" -}}
{{- $mode := default "standalone" .Values.mode }}
{{- if not (has $mode (list "standalone" "cluster")) }}
{{- fail (printf "mode must be \"standalone\" or \"cluster\", not %q" $mode) }}
{{- end }}
{{- $mode }}
{{- end }}

{{/*
Whether this release runs in cluster mode ("true" or "").
*/}}
{{- define "tollgate.cluster" -}}
{{- if eq (include "tollgate.mode" .) "cluster" }}true{{ end }}
{{- end }}

{{/*
Name of the head config Secret the operator publishes and the data plane reads (cluster
mode). `<fullname>-config`: `tollgate-config`, the binaries' default, for a release named
`tollgate`.
*/}}
{{- define "tollgate.configName" -}}
{{- default (printf "%s-config" (include "tollgate.fullname" .)) .Values.config.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The data plane's service account (cluster mode).
*/}}
{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-dataplane" (include "tollgate.fullname" .)) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Whether the chart runs its own Redis ("true" or ""): `redis.bundled.enabled` and no Redis of
the user's.
*/}}
{{- define "tollgate.bundledRedis" -}}
{{- if and .Values.redis.bundled.enabled (not .Values.redis.url) (not .Values.redis.existingSecret) }}true{{ end }}
{{- end }}

{{/*
Name of the bundled Redis (StatefulSet, Service).
*/}}
{{- define "tollgate.redisName" -}}
{{- printf "%s-redis" (include "tollgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Redis URL the chart stores in its Secret: `redis.url`, or the bundled Redis's. Empty with
`redis.existingSecret` (the URL is then the user's) or without Redis.
*/}}
{{- define "tollgate.redisUrl" -}}
{{- if .Values.redis.existingSecret }}
{{- else if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else if include "tollgate.bundledRedis" . }}
{{- printf "redis://%s.%s.svc:6379/0" (include "tollgate.redisName" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the Redis URL: the user's, or the one this chart renders from
`redis.url` or for the bundled Redis. Empty when no Redis is configured.
*/}}
{{- define "tollgate.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else if include "tollgate.redisUrl" . }}
{{- printf "%s-redis" (include "tollgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
`TOLLGATE_REDIS_URL` from the Redis Secret, for the env of both containers.
*/}}
{{- define "tollgate.redisEnv" -}}
{{- with include "tollgate.redisSecretName" . }}
- name: TOLLGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.existingSecretKey | default "url" }}
{{- end }}
{{- end }}

{{/*
Operator: names, labels, image.
*/}}
{{- define "tollgate.operatorName" -}}
{{- printf "%s-operator" (include "tollgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tollgate.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tollgate.operatorLabels" -}}
{{ include "tollgate.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "tollgate.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "tollgate.operatorName" .) .Values.operator.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the operator's leader-election Lease: `<fullname>-operator`, so `tollgate-operator`
(the binary's default) for a release named `tollgate`.
*/}}
{{- define "tollgate.leaseName" -}}
{{- default (include "tollgate.operatorName" .) .Values.operator.leaseName }}
{{- end }}

{{- define "tollgate.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/*
Metadata the chart adds to each CRD it installs: its labels, `helm.sh/resource-policy: keep`
(unless `crds.keep` is off) and an early Argo CD sync wave, so that the CRDs exist before any
custom resource of the same Application is applied.
*/}}
{{- define "tollgate.crdMetadata" -}}
labels:
  {{- include "tollgate.commonLabels" . | nindent 2 }}
annotations:
  {{- if .Values.crds.keep }}
  helm.sh/resource-policy: keep
  {{- end }}
  argocd.argoproj.io/sync-wave: "-10"
{{- end }}

{{/*
`apiVersion` of PodDisruptionBudgets: `policy/v1` from Kubernetes 1.21 on (and when rendering
without a cluster), else `policy/v1beta1`.
*/}}
{{- define "tollgate.pdbApiVersion" -}}
{{- if semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version }}policy/v1{{ else }}policy/v1beta1{{ end }}
{{- end }}

{{/*
`apiVersion` of HorizontalPodAutoscalers: `autoscaling/v2` from 1.23 on, else
`autoscaling/v2beta2` (the same fields).
*/}}
{{- define "tollgate.hpaApiVersion" -}}
{{- if semverCompare ">=1.23-0" .Capabilities.KubeVersion.Version }}autoscaling/v2{{ else }}autoscaling/v2beta2{{ end }}
{{- end }}

{{/*
A PodDisruptionBudget's limit: `minAvailable` when set, else `maxUnavailable`.
*/}}
{{- define "tollgate.pdbLimit" -}}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if ne (toString $pdb.minAvailable) "" }}
minAvailable: {{ $pdb.minAvailable }}
{{- else }}
maxUnavailable: {{ $pdb.maxUnavailable }}
{{- end }}
{{- end }}

{{/*
Egress rules of the release's pods when `networkPolicy.restrictEgress` is on: DNS, the bundled
Redis, and `networkPolicy.extraEgress` (providers, the Kubernetes API server).
*/}}
{{- define "tollgate.egressCommon" -}}
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- if include "tollgate.bundledRedis" . }}
- ports:
    - port: 6379
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          app.kubernetes.io/instance: {{ .Release.Name }}
          app.kubernetes.io/component: redis
{{- end }}
{{- with .Values.networkPolicy.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}
