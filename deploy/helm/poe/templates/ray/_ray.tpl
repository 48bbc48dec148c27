{{/*
The pod template of a Ray node (the head or a worker group) of the RayCluster. KubeRay fills in
the `ray start` command and its probes, and labels the pods (ray.io/node-type, ray.io/group). Takes (dict "ctx" $ "node" "head"|"cpu-worker"|"gpu-worker"
"group" VALUES "image" IMAGE "gpus" N).
*/}}
{{- define "poe.rayPod" -}}
{{- $ctx := .ctx -}}
{{- $c := dict "ctx" $ctx "component" "ray" -}}
{{- $limits := deepCopy (.group.resources.limits | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $limits "nvidia.com/gpu" (toString .gpus) -}}
{{- end -}}
{{- $resources := deepCopy .group.resources -}}
{{- $_ := set $resources "limits" $limits -}}
metadata:
  labels:
    {{- include "poe.labels" $c | nindent 4 }}
spec:
  serviceAccountName: {{ include "poe.serviceAccountName" $ctx }}
  automountServiceAccountToken: {{ $ctx.Values.serviceAccount.automountToken }}
  {{- with include "poe.imagePullSecrets" $ctx | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  {{- with include "poe.scheduling" .group | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .node "head") }}
      image: {{ .image }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      {{- if eq .node "head" }}
      ports:
        - {name: gcs-server, containerPort: 6379, protocol: TCP}
        - {name: client, containerPort: 10001, protocol: TCP}
      {{- end }}
      env:
        # Ray keeps its session files under /tmp and its token under $HOME (the root filesystem is read-only).
        - {name: HOME, value: /tmp}
        # Every Ray node and the extractor (its only client) share the release's service token.
        - {name: RAY_AUTH_MODE, value: token}
        - name: RAY_AUTH_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ include "poe.authSecretName" $ctx }}
              key: service-token
      # The cluster's GCS answers (`ray health-check`). Given probes, KubeRay adds none of its own,
      # which call Ray's dashboard agent with wget: the image has neither.
      readinessProbe:
        exec: {command: ["ray", "health-check"]}
        periodSeconds: 10
        timeoutSeconds: 10
        failureThreshold: 3
      livenessProbe:
        exec: {command: ["ray", "health-check"]}
        initialDelaySeconds: 30
        periodSeconds: 30
        timeoutSeconds: 10
        failureThreshold: 5
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $ctx.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: shm, mountPath: /dev/shm}
  volumes:
    {{- include "poe.scratchVolumes" $ctx | nindent 4 }}
    # Ray's object store lives in shared memory; a container's own /dev/shm holds only 64 MiB.
    - name: shm
      emptyDir: {medium: Memory}
{{- end -}}


{{/* `ray start` parameters as strings: the chart's defaults, then the values' (which win). */}}
{{- define "poe.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := merge (dict) .params .defaults -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}
