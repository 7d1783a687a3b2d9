#!/bin/sh
# Start the example PBX. Behind an injected mid-registrar sidecar (MIDREGISTRAR_PBX_PORT is set by the
# injection), it listens on the pod's loopback at that port and the sidecar takes the SIP port; alone, it
# listens on the pod's address at 5060. Its trunk side (calls from elsewhere) is the pod's address at 5080.
set -eu
pod_ip="${POD_IP:?POD_IP (the downward API's status.podIP) is needed}"
if [ -n "${MIDREGISTRAR_PBX_PORT:-}" ]; then
    listen="udp:127.0.0.1:${MIDREGISTRAR_PBX_PORT}"
else
    listen="udp:${pod_ip}:5060"
fi
mkdir -p /tmp/kamailio
exec kamailio -DD -E -f /etc/kamailio/pbx.cfg -Y /tmp/kamailio -w /tmp/kamailio \
    -l "$listen" -l "udp:${pod_ip}:5080" "$@"
