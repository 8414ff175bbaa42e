{{/*
The pod template of every radai Deployment. Arguments: root (the chart context), role (all, receiver or
worker) and spec (the values of embedded, receiver or worker).
*/}}
{{- define "radai.podTemplate" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $spec := .spec -}}
{{- $gpu := int (default 0 $spec.gpu) -}}
{{- $front := ne $role "worker" -}}
metadata:
  labels:
    {{- include "radai.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $role }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $root.Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "radai.serviceAccountName" $root }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $spec.terminationGracePeriodSeconds }}
  securityContext:
    {{- include "radai.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: radai
      image: {{ include "radai.image" (dict "root" $root "gpu" $gpu) | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: ["serve", "-c", "/etc/radai/radai.yaml"]
      securityContext:
        {{- include "radai.containerSecurityContext" $root | nindent 8 }}
      ports:
        {{- if $front }}
        - name: dicom
          containerPort: {{ $root.Values.ports.dicom }}
          protocol: TCP
        {{- end }}
        - name: http-api
          containerPort: {{ $root.Values.ports.api }}
          protocol: TCP
      env:
        - {name: HOME, value: /tmp}
        - {name: XDG_CACHE_HOME, value: /tmp/.cache}
        - {name: PYTHONDONTWRITEBYTECODE, value: "1"}
        - {name: RADAI_LOG_FORMAT, value: {{ $root.Values.logFormat | quote }}}
        - {name: RADAI_STORAGE__DATA_DIR, value: /data}
        - {name: RADAI_DICOM__HOST, value: 0.0.0.0}
        - {name: RADAI_DICOM__PORT, value: {{ $root.Values.ports.dicom | quote }}}
        - {name: RADAI_API__HOST, value: 0.0.0.0}
        - {name: RADAI_API__PORT, value: {{ $root.Values.ports.api | quote }}}
        - name: RADAI_API__ADMIN_TOKEN
          valueFrom:
            secretKeyRef: {name: {{ include "radai.apiSecretName" $root }}, key: admin-token}
        - name: RADAI_API__READ_TOKEN
          valueFrom:
            secretKeyRef: {name: {{ include "radai.apiSecretName" $root }}, key: read-token, optional: true}
        {{- if $root.Values.scaleout.enabled }}
        - {name: RADAI_SCALEOUT__MODE, value: distributed}
        - {name: RADAI_SCALEOUT__ROLE, value: {{ $role }}}
        - name: RADAI_SCALEOUT__DATABASE_URL
          valueFrom:
            secretKeyRef: {name: {{ include "radai.urlSecretName" $root }}, key: database-url}
        - name: RADAI_SCALEOUT__REDIS_URL
          valueFrom:
            secretKeyRef: {name: {{ include "radai.urlSecretName" $root }}, key: redis-url}
        - name: RADAI_SCALEOUT__CONSUMER_NAME
          valueFrom:
            fieldRef: {fieldPath: metadata.name}
        {{- else }}
        - {name: RADAI_SCALEOUT__MODE, value: embedded}
        - {name: RADAI_SCALEOUT__ROLE, value: all}
        {{- end }}
        {{- if and $front $root.Values.dicom.tls.enabled }}
        - {name: RADAI_DICOM__TLS__CERT_FILE, value: /etc/radai/tls/tls.crt}
        - {name: RADAI_DICOM__TLS__KEY_FILE, value: /etc/radai/tls/tls.key}
        {{- if $root.Values.dicom.tls.requireClientCert }}
        - {name: RADAI_DICOM__TLS__CA_FILE, value: /etc/radai/tls/ca.crt}
        - {name: RADAI_DICOM__TLS__REQUIRE_CLIENT_CERT, value: "true"}
        {{- end }}
        {{- end }}
        {{- with $root.Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        # Loading and reference-checking the models may take minutes: 10 minutes before liveness applies.
        httpGet: {path: /livez, port: http-api}
        periodSeconds: 10
        failureThreshold: 60
      livenessProbe:
        httpGet: {path: /livez, port: http-api}
        periodSeconds: 20
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        httpGet: {path: /readyz, port: http-api}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      resources:
        {{- $resources := deepCopy (default dict $spec.resources) }}
        {{- if gt $gpu 0 }}
        {{- $limits := default dict $resources.limits }}
        {{- $_ := set $limits "nvidia.com/gpu" $gpu }}
        {{- $_ := set $resources "limits" $limits }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - {name: data, mountPath: /data}
        - {name: config, mountPath: /etc/radai/radai.yaml, subPath: radai.yaml, readOnly: true}
        - {name: tmp, mountPath: /tmp}
        {{- if and $front $root.Values.dicom.tls.enabled }}
        - {name: dicom-tls, mountPath: /etc/radai/tls, readOnly: true}
        {{- end }}
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "radai.claimName" $root }}
    - name: config
      configMap:
        name: {{ include "radai.fullname" $root }}-config
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.tmpSizeLimit }}
    {{- if and $front $root.Values.dicom.tls.enabled }}
    - name: dicom-tls
      secret:
        secretName: {{ $root.Values.dicom.tls.secretName }}
        defaultMode: 0440
    {{- end }}
  {{- with $spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
