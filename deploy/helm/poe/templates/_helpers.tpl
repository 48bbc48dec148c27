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

{{/*
An image reference: repository@digest, else repository:tag. With global.imageRegistry the
repository's own registry host (its first path part when that contains a dot or a colon, or is
localhost) is replaced by it, or it is put in front when the repository names none.
Takes (dict "ctx" $ "repository" R "tag" T "digest" D).
*/}}
{{- define "poe.imageRef" -}}
{{- $repository := .repository -}}
{{- with (.ctx.Values.global | default dict).imageRegistry -}}
{{- $parts := splitList "/" $repository -}}
{{- $first := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $repository = join "/" (rest $parts) -}}
{{- end -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository -}}
{{- end -}}
{{- if .digest -}}
{{- printf "%s@%s" $repository .digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (toString .tag) -}}
{{- end -}}
{{- end -}}

{{/* The one PoE image (the tag defaults to appVersion). */}}
{{- define "poe.image" -}}
{{- include "poe.imageRef" (dict "ctx" . "repository" .Values.image.repository "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) -}}
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

{{/*
Probes against grpc.health.v1 on ports.grpc: the kubelet's native gRPC probe, or with TLS (which
that probe cannot speak) the image's health-check script as an exec probe. The script takes the CA
and client certificate from the container's POE_TLS_* variables and checks the certificate for the
component's Service name. Takes (dict "ctx" $ "component" NAME "probes" VALUES "service" GRPC_NAME).
*/}}
{{- define "poe.probeAction" -}}
{{- if .ctx.Values.tls.enabled -}}
exec:
  command: {{ list "python" "/opt/poe/bin/grpc_health_probe.py" "--addr" (printf "127.0.0.1:%v" .ctx.Values.ports.grpc) "--service" .service "--tls-server-name" (include "poe.componentName" .) | toJson }}
{{- else -}}
grpc:
  port: {{ int .ctx.Values.ports.grpc }}
  service: {{ .service | quote }}
{{- end -}}
{{- end -}}

{{- define "poe.probes" -}}
{{- $live := merge (dict "service" (.probes.livenessService | default "liveness")) . -}}
{{- with .probes.startup }}
startupProbe:
  {{- include "poe.probeAction" $ | nindent 2 }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .probes.liveness }}
livenessProbe:
  {{- include "poe.probeAction" $live | nindent 2 }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .probes.readiness }}
readinessProbe:
  {{- include "poe.probeAction" $ | nindent 2 }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod annotations: restart on config/secret changes; scrape hints for annotation-based Prometheus. */}}
{{- define "poe.podAnnotations" -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
checksum/secret: {{ include (print .ctx.Template.BasePath "/secrets.yaml") .ctx | sha256sum }}
checksum/secret-ref: {{ toJson (list .ctx.Values.database.auth .ctx.Values.objectStore.auth) | sha256sum }}
checksum/auth: {{ include "poe.authChecksum" .ctx }}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .ctx.Values.ports.metrics | quote }}
prometheus.io/path: /metrics
{{- if .ctx.Values.tls.enabled }}
prometheus.io/scheme: https
{{- end }}
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


{{/* appProtocol of the Service ports: HTTP/2 in the clear, or TLS. */}}
{{- define "poe.grpcAppProtocol" -}}
{{- ternary "https" "kubernetes.io/h2c" .Values.tls.enabled -}}
{{- end -}}

{{- define "poe.metricsAppProtocol" -}}
{{- ternary "https" "http" .Values.tls.enabled -}}
{{- end -}}

{{/* -- Authentication: the token file and the service token ------------------------------------ */}}

{{- define "poe.authSecretName" -}}
{{- default (include "poe.componentName" (dict "ctx" . "component" "auth")) .Values.auth.existingSecret -}}
{{- end -}}

{{/*
The data of the chart-made auth Secret (base64 values, as a JSON object): the Secret that is
already in the cluster when it has both keys (`lookup`, so upgrades keep the token), else a new
random service token and a tokens.json holding only its sha256. Memoized in .Values so that every
template of one render sees the same token (the Secret and the pods' checksum annotation).
*/}}
{{- define "poe.generatedAuth" -}}
{{- if not (hasKey .Values.auth "_generated") -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "poe.authSecretName" .) -}}
{{- $data := dict -}}
{{- if and $existing (hasKey ($existing.data | default dict) "tokens.json") (hasKey ($existing.data | default dict) "service-token") -}}
{{- $data = dict "tokens.json" (index $existing.data "tokens.json") "service-token" (index $existing.data "service-token") -}}
{{- else -}}
{{- $token := printf "poe_service_%s" (randAlphaNum 40) -}}
{{- $entry := dict "id" "service" "name" "service token made by the Helm chart" "role" "service" "sha256" (sha256sum $token) "created" (dateInZone "2006-01-02T15:04:05Z" (now) "UTC") "expires" nil "revoked" nil -}}
{{- $tokens := dict "tokens" (list $entry) | toJson -}}
{{- $data = dict "tokens.json" ($tokens | b64enc) "service-token" ($token | b64enc) -}}
{{- end -}}
{{- $_ := set .Values.auth "_generated" $data -}}
{{- end -}}
{{- toJson .Values.auth._generated -}}
{{- end -}}

{{/* Rolls the pods when the token Secret is replaced: its name, or the chart-made token file. */}}
{{- define "poe.authChecksum" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret | sha256sum -}}
{{- else -}}
{{- index (include "poe.generatedAuth" . | fromJson) "tokens.json" | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* -- TLS --------------------------------------------------------------------------------------- */}}

{{- define "poe.tlsSecretName" -}}
{{- if .Values.tls.existingSecret -}}
{{- .Values.tls.existingSecret -}}
{{- else if .Values.tls.certManager.enabled -}}
{{- include "poe.componentName" (dict "ctx" . "component" "tls") -}}
{{- else -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with ca.crt) or tls.certManager.enabled" -}}
{{- end -}}
{{- end -}}

{{/*
Environment, mounts and volumes that put the token file and the TLS files into a PoE service
container. Takes (dict "ctx" $ "component" NAME). The composer and the extractor call the registry,
so they also get the service token and, under mutual TLS, present the certificate as clients.
*/}}
{{- define "poe.securityEnv" -}}
{{- $v := .ctx.Values -}}
- {name: POE_TOKENS_FILE, value: /etc/poe/auth/tokens.json}
{{- if has .component (list "composer" "extractor") }}
- name: POE_SERVICE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "poe.authSecretName" .ctx }}
      key: service-token
{{- end }}
{{- if $v.tls.enabled }}
- {name: POE_TLS_SERVER_CERT, value: /etc/poe/tls/tls.crt}
- {name: POE_TLS_SERVER_KEY, value: /etc/poe/tls/tls.key}
- {name: POE_TLS_CA, value: /etc/poe/tls/ca.crt}
{{- if $v.tls.clientAuth }}
- {name: POE_TLS_CLIENT_CA, value: /etc/poe/tls/ca.crt}
- {name: POE_TLS_CERT, value: /etc/poe/tls/tls.crt}
- {name: POE_TLS_KEY, value: /etc/poe/tls/tls.key}
{{- end }}
{{- end }}
{{- end -}}

{{- define "poe.securityVolumeMounts" -}}
- {name: auth, mountPath: /etc/poe/auth, readOnly: true}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: /etc/poe/tls, readOnly: true}
{{- end }}
{{- end -}}

{{/* A whole-directory mount (no subPath), so that a changed Secret reaches the running pods. */}}
{{- define "poe.securityVolumes" -}}
- name: auth
  secret:
    secretName: {{ include "poe.authSecretName" . }}
    items: [{key: tokens.json, path: tokens.json}]
    defaultMode: 0440
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "poe.tlsSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

