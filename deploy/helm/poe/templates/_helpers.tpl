{{/*
Names, labels and the pieces every PoE component shares. Components are "registry", "composer",
"extractor", "migrate" (the schema Job), "postgresql" and "minio" (the optional in-chart trial
dependencies). Helpers that need a component take (dict "ctx" $ "component" "NAME").
*/}}

{{- define "poe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "poe.fullname" -}}
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

{{/* Name of one component's objects: FULLNAME-COMPONENT. */}}
{{- define "poe.componentName" -}}
{{- printf "%s-%s" (include "poe.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "poe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one component's pods (stable across upgrades: never add to these). */}}
{{- define "poe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "poe.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of every pod of this release, whatever the component. */}}
{{- define "poe.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "poe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Full label set of an object of one component. */}}
{{- define "poe.labels" -}}
helm.sh/chart: {{ include "poe.chart" .ctx }}
{{ include "poe.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: poe
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "poe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "poe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The one image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "poe.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* host:port of a component's Service, as the other components dial it. */}}
{{- define "poe.addr" -}}
{{- printf "%s:%v" (include "poe.componentName" .) .ctx.Values.ports.grpc -}}
{{- end -}}

{{/* Credentials Secrets: the operator's existingSecret, else the one this chart creates. */}}
{{- define "poe.databaseSecretName" -}}
{{- default (include "poe.componentName" (dict "ctx" . "component" "database")) .Values.database.auth.existingSecret -}}
{{- end -}}

{{- define "poe.objectStoreSecretName" -}}
{{- default (include "poe.componentName" (dict "ctx" . "component" "object-store")) .Values.objectStore.auth.existingSecret -}}
{{- end -}}

{{- define "poe.databaseHost" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "poe.componentName" (dict "ctx" . "component" "postgresql") -}}
{{- else -}}
{{- required "database.host is required (or postgresql.enabled=true for a one-node trial)" .Values.database.host -}}
{{- end -}}
{{- end -}}

{{- define "poe.objectStoreEndpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s:9000" (include "poe.componentName" (dict "ctx" . "component" "minio")) -}}
{{- else -}}
{{- required "objectStore.endpoint is required (or minio.enabled=true for a one-node trial)" .Values.objectStore.endpoint -}}
{{- end -}}
{{- end -}}

{{/* Fails the render when neither an existingSecret nor trial credentials are given. */}}
{{- define "poe.validateCredentials" -}}
{{- if not .Values.database.auth.existingSecret -}}
{{- $_ := required "database.auth.existingSecret (production) or database.auth.password (trial) is required" .Values.database.auth.password -}}
{{- end -}}
{{- if not .Values.objectStore.auth.existingSecret -}}
{{- $_ := required "objectStore.auth.existingSecret (production) or objectStore.auth.accessKey (trial) is required" .Values.objectStore.auth.accessKey -}}
{{- $_ := required "objectStore.auth.existingSecret (production) or objectStore.auth.secretKey (trial) is required" .Values.objectStore.auth.secretKey -}}
{{- end -}}
{{- end -}}

{{/*
Database and object-store environment of the registry and the migration Job. The password is
never in a ConfigMap or the pod spec: the URL is assembled by Kubernetes' $(VAR) expansion from the
Secret's keys, or read whole from database.auth.urlKey.
*/}}
{{- define "poe.storageEnv" -}}
{{- $db := .Values.database -}}
{{- if $db.auth.urlKey }}
- name: POE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "poe.databaseSecretName" . }}
      key: {{ $db.auth.urlKey }}
{{- else }}
- name: POE_DATABASE_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "poe.databaseSecretName" . }}
      key: {{ $db.auth.usernameKey }}
- name: POE_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "poe.databaseSecretName" . }}
      key: {{ $db.auth.passwordKey }}
- name: POE_DATABASE_URL
  value: {{ printf "postgresql+psycopg://$(POE_DATABASE_USERNAME):$(POE_DATABASE_PASSWORD)@%s:%v/%s%s" (include "poe.databaseHost" .) $db.port $db.name (ternary (printf "?%s" $db.params) "" (ne $db.params "")) | quote }}
{{- end }}
- name: POE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "poe.objectStoreSecretName" . }}
      key: {{ .Values.objectStore.auth.accessKeyKey }}
- name: POE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "poe.objectStoreSecretName" . }}
      key: {{ .Values.objectStore.auth.secretKeyKey }}
{{- end -}}

{{/* Environment shared by every PoE container that does not come from the ConfigMap. */}}
{{- define "poe.extraEnv" -}}
{{- range $name, $value := .extraEnv }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Native gRPC probes against grpc.health.v1; the port follows ports.grpc. */}}
{{- define "poe.probes" -}}
{{- $port := int .ctx.Values.ports.grpc -}}
{{- with .probes.startup }}
startupProbe:
  grpc:
    port: {{ $port }}
    service: {{ $.service | quote }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .probes.liveness }}
livenessProbe:
  grpc:
    port: {{ $port }}
    service: {{ $.probes.livenessService | default "liveness" | quote }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .probes.readiness }}
readinessProbe:
  grpc:
    port: {{ $port }}
    service: {{ $.service | quote }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod annotations: restart on config/secret changes; scrape hints for annotation-based Prometheus. */}}
{{- define "poe.podAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
checksum/secret: {{ include (print .ctx.Template.BasePath "/secrets.yaml") .ctx | sha256sum }}
checksum/secret-ref: {{ toJson (list .ctx.Values.database.auth .ctx.Values.objectStore.auth) | sha256sum }}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .ctx.Values.ports.metrics | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Writable scratch space under a read-only root filesystem. */}}
{{- define "poe.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "poe.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling knobs of one component's values. */}}
{{- define "poe.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* PodDisruptionBudget of one component: minAvailable when set, else maxUnavailable. */}}
{{- define "poe.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "poe.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "poe.labels" . | nindent 4 }}
spec:
  {{- if ne (toString .pdb.minAvailable) "" }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "poe.selectorLabels" . | nindent 6 }}
{{- end -}}
