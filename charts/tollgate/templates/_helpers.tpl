{{- define "tollgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollgate.labels" -}}
app.kubernetes.io/part-of: tollgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tollgate.gatewaySelector" -}}
app.kubernetes.io/name: tollgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "tollgate.image" -}}
{{- if .digest -}}{{ .repository }}@{{ .digest }}{{- else -}}{{ .repository }}:{{ .tag }}{{- end -}}
{{- end -}}

{{/* The variable holding a provider's key: TOLLGATE_<NAME>_KEY (deploy/render.py provider_env). */}}
{{- define "tollgate.keyEnv" -}}
{{- printf "TOLLGATE_%s_KEY" (. | upper | replace "-" "_") -}}
{{- end -}}

{{/* A provider URL's parts as JSON: scheme, host, port, authority (host, with the port unless default). */}}
{{- define "tollgate.url" -}}
{{- $u := urlParse . -}}
{{- $host := regexReplaceAll ":[0-9]+$" $u.host "" -}}
{{- $explicit := regexFind "[0-9]+$" (regexFind ":[0-9]+$" $u.host) -}}
{{- $default := ternary "443" "80" (eq $u.scheme "https") -}}
{{- $port := $explicit | default $default -}}
{{- $authority := ternary $host (printf "%s:%s" $host $port) (eq $port $default) -}}
{{- dict "scheme" $u.scheme "host" $host "port" $port "authority" $authority | toJson -}}
{{- end -}}

{{- define "tollgate.redisEnabled" -}}
{{- if and (eq .Values.limiter.backend "redis") (not .Values.limiter.webdisHost) -}}true{{- end -}}
{{- end -}}

{{/* The plugin configuration JSON (docs/configuration.md), built from the values. */}}
{{- define "tollgate.pluginConfig" -}}
{{- $clients := list -}}
{{- range .Values.clients -}}
{{- $c := dict "name" .name -}}
{{- if .key_sha256 }}{{ $_ := set $c "key_sha256" .key_sha256 }}{{ end -}}
{{- if .key_md5 }}{{ $_ := set $c "key_md5" .key_md5 }}{{ end -}}
{{- if .keys }}{{ $_ := set $c "keys" .keys }}{{ end -}}
{{- if .requests_per_minute }}{{ $_ := set $c "requests_per_minute" (int64 .requests_per_minute) }}{{ end -}}
{{- if .tokens_per_minute }}{{ $_ := set $c "tokens_per_minute" (int64 .tokens_per_minute) }}{{ end -}}
{{- if .models }}{{ $_ := set $c "models" .models }}{{ end -}}
{{- if .budgets -}}
{{- $budgets := list -}}
{{- range .budgets -}}
{{- $b := dict "window" .window -}}
{{- if hasKey . "requests" }}{{ $_ := set $b "requests" (int64 .requests) }}{{ end -}}
{{- if hasKey . "tokens" }}{{ $_ := set $b "tokens" (int64 .tokens) }}{{ end -}}
{{- if hasKey . "money" }}{{ $_ := set $b "money" .money }}{{ end -}}
{{- $budgets = append $budgets $b -}}
{{- end -}}
{{- $_ := set $c "budgets" $budgets -}}
{{- end -}}
{{- $clients = append $clients $c -}}
{{- end -}}
{{- $providers := list -}}
{{- range .Values.providers -}}
{{- $url := include "tollgate.url" .url | fromJson -}}
{{- $p := dict "name" .name "cluster" (printf "provider_%s" .name) "api_key_env" (include "tollgate.keyEnv" .name) "authority" $url.authority -}}
{{- if .pathPrefix }}{{ $_ := set $p "path_prefix" .pathPrefix }}{{ end -}}
{{- if .headers }}{{ $_ := set $p "headers" .headers }}{{ end -}}
{{- $providers = append $providers $p -}}
{{- end -}}
{{- $limiter := dict "backend" .Values.limiter.backend -}}
{{- if eq .Values.limiter.backend "redis" -}}
{{- $_ := set $limiter "cluster" "webdis" -}}
{{- $_ := set $limiter "timeout_ms" (int64 .Values.limiter.timeoutMs) -}}
{{- $_ := set $limiter "on_error" .Values.limiter.onError -}}
{{- $_ := set $limiter "basic_auth_env" "TOLLGATE_WEBDIS_AUTH" -}}
{{- else if .Values.limiter.budgetsOnRestart -}}
{{- $_ := set $limiter "budgets_on_restart" .Values.limiter.budgetsOnRestart -}}
{{- end -}}
{{- $cfg := dict "access_log" true "clients" $clients "default_requests_per_minute" (int64 .Values.defaultRequestsPerMinute) "providers" $providers "models" .Values.models "limiter" $limiter -}}
{{- if .Values.defaultProvider }}{{ $_ := set $cfg "default_provider" .Values.defaultProvider }}{{ end -}}
{{- if .Values.prices -}}
{{- $_ := set $cfg "currency" (.Values.currency | default "USD") -}}
{{- $_ := set $cfg "prices" .Values.prices -}}
{{- end -}}
{{- if .Values.budgetUtcOffsetMinutes }}{{ $_ := set $cfg "budget_utc_offset_minutes" (int64 .Values.budgetUtcOffsetMinutes) }}{{ end -}}
{{- $cfg | toJson -}}
{{- end -}}

{{/* The variables Envoy passes into the wasm VM (host_env_keys), as JSON: each provider's key,
and Webdis's basic auth with the Redis limiter. */}}
{{- define "tollgate.hostEnvKeys" -}}
{{- $keys := list -}}
{{- range .Values.providers }}{{ $keys = append $keys (include "tollgate.keyEnv" .name) }}{{ end -}}
{{- if eq .Values.limiter.backend "redis" }}{{ $keys = append $keys "TOLLGATE_WEBDIS_AUTH" }}{{ end -}}
{{- $keys | toJson -}}
{{- end -}}
