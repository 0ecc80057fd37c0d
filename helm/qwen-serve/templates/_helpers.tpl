{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "qwen-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qwen-serve.fullname" -}}
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

{{- define "qwen-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qwen-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "qwen-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The serving config file, exactly the values' `serving` section. */}}
{{- define "qwen-serve.config" -}}
{{- toYaml .Values.serving }}
{{- end }}

{{- define "qwen-serve.device" -}}
{{- (.Values.serving.engine | default dict).device | default "auto" }}
{{- end }}

{{/* GPUs one stack needs: replicas x tensor_parallel_size, none on a CPU engine. */}}
{{- define "qwen-serve.gpus" -}}
{{- $topo := .Values.serving.topology | default dict }}
{{- if eq (include "qwen-serve.device" .) "cpu" }}0
{{- else if .Values.gpus }}{{ .Values.gpus }}
{{- else }}{{ mul ($topo.replicas | default 1) ($topo.tensor_parallel_size | default 1) }}
{{- end }}
{{- end }}

{{- define "qwen-serve.drainSeconds" -}}
{{- $server := .Values.serving.server | default dict }}
{{- if hasKey $server "drain_timeout_s" }}{{ $server.drain_timeout_s | ceil | int }}{{ else }}30{{ end }}
{{- end }}

{{/* Longer than the server's drain plus the preStop sleep, so SIGKILL never cuts a drain. */}}
{{- define "qwen-serve.terminationGracePeriodSeconds" -}}
{{- add (include "qwen-serve.drainSeconds" . | int) .Values.lifecycle.preStopSleepSeconds .Values.lifecycle.terminationMarginSeconds }}
{{- end }}

{{- define "qwen-serve.port" -}}
{{- ((.Values.serving.server | default dict).port | default 8000) | int }}
{{- end }}

{{/*
The container that runs `qwen-serve serve`: the router/ingress plus (standalone) the
Ray head and the engines. Call with (dict "root" $ "gpus" N "args" LIST "extraEnv" LIST "extraMounts" LIST).
*/}}
{{- define "qwen-serve.serveContainer" -}}
{{- $root := .root -}}
{{- $gpus := .gpus | int -}}
- name: qwen-serve
  image: "{{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}"
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: ["qwen-serve", "serve", "--config", "/etc/qwen-serve/config.yaml"]
  {{- with .args }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: http
      containerPort: {{ include "qwen-serve.port" $root }}
      protocol: TCP
  env:
    - name: HF_HOME
      value: /var/cache/qwen-serve/huggingface
    {{- with $root.Values.secrets.hfToken.existingSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $root.Values.secrets.hfToken.key }}
    {{- end }}
    {{- with $root.Values.secrets.engineKey.existingSecret }}
    # The engines' key from the deployment, so it is never stored on the Ray cluster.
    - name: QWEN_SERVE_ENGINE_KEY
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $root.Values.secrets.engineKey.key }}
    {{- end }}
    {{- if $root.Values.secrets.apiKeys.existingSecret }}
    - name: QWEN_SERVE__SERVER__API_KEYS_FILE
      value: /etc/qwen-serve/secrets/{{ $root.Values.secrets.apiKeys.key }}
    {{- end }}
    {{- with .extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $root.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /health
      port: http
    periodSeconds: {{ $root.Values.probes.startup.periodSeconds }}
    failureThreshold: {{ $root.Values.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /health
      port: http
    periodSeconds: {{ $root.Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $root.Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $root.Values.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /ready
      port: http
    periodSeconds: {{ $root.Values.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $root.Values.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $root.Values.probes.readiness.failureThreshold }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", "{{ $root.Values.lifecycle.preStopSleepSeconds }}"]
  resources:
    {{- $res := deepCopy ($root.Values.resources | default dict) }}
    {{- if gt $gpus 0 }}
    {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $gpus) ($res.limits | default dict)) }}
    {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $gpus) ($res.requests | default dict)) }}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/qwen-serve/config.yaml
      subPath: config.yaml
      readOnly: true
    - name: model-cache
      mountPath: /var/cache/qwen-serve
    - name: dshm
      mountPath: /dev/shm
    {{- with .extraMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- include "qwen-serve.adaptersMount" $root | nindent 4 }}
    {{- if $root.Values.secrets.apiKeys.existingSecret }}
    - name: api-keys
      mountPath: /etc/qwen-serve/secrets
      readOnly: true
    {{- end }}
{{- end }}

{{/* Pod volumes matching qwen-serve.serveContainer's mounts. */}}
{{- define "qwen-serve.volumes" -}}
- name: config
  configMap:
    name: {{ include "qwen-serve.fullname" . }}-config
- name: model-cache
  {{- if .Values.modelCache.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelCache.existingClaim | default (printf "%s-model-cache" (include "qwen-serve.fullname" .)) }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
{{- include "qwen-serve.adaptersVolume" . }}
{{- if .Values.secrets.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.secrets.apiKeys.existingSecret }}
{{- end }}
{{- end }}

{{/* The LoRA adapters' claim, read-only, where every engine finds it. */}}
{{- define "qwen-serve.adaptersMount" -}}
{{- if .Values.adapters.existingClaim }}
- name: adapters
  mountPath: {{ .Values.adapters.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "qwen-serve.adaptersVolume" -}}
{{- if .Values.adapters.existingClaim }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ .Values.adapters.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{/* An adapter read from the mount path needs the claim that fills it. */}}
{{- define "qwen-serve.checkAdapters" -}}
{{- $mount := .Values.adapters.mountPath }}
{{- range $name, $adapter := ((.Values.serving.model | default dict).adapters | default dict) }}
{{- if and (hasPrefix $mount (toString $adapter.source)) (not $.Values.adapters.existingClaim) }}
{{- fail (printf "serving.model.adapters.%s reads %s, under adapters.mountPath, but adapters.existingClaim is not set: nothing is mounted there" $name $adapter.source) }}
{{- end }}
{{- end }}
{{- end }}

{{/* A Ray worker node is alive and ready when its raylet is: asked of the node's
dashboard agent (port 52365; this endpoint needs no token).
tests/test_multinode.py runs this very command against a real worker node. */}}
{{- define "qwen-serve.rayletProbe" -}}
exec:
  command:
    - python3
    - -c
    - "import sys, urllib.request as u; sys.exit(0 if b'success' in u.urlopen('http://127.0.0.1:52365/api/local_raylet_healthz', timeout=2).read() else 1)"
periodSeconds: 10
timeoutSeconds: 5
{{- end }}
