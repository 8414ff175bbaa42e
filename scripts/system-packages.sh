#!/usr/bin/env bash
# Debian packages the tests talk to: DCMTK (storescu/echoscu/storescp, a real PACS client and receiver),
# dicom3tools (dciodvfy, IOD validation) and Orthanc with its DICOMweb plugin (a real PACS and STOW-RS
# server; the tests start their own instance on free loopback ports) and Prometheus (scrapes radai in an
# integration test, on loopback), PostgreSQL and Redis (the scale-out store and job streams; the tests run their
# own servers on loopback). Installs only what is missing.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# Packages such as orthanc and prometheus start their system service on install where they can; the tests
# start their own instances on loopback, so forbid service starts during the install (policy-rc.d, exit 101).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
