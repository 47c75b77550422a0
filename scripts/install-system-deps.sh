#!/usr/bin/env bash
# Installs the Debian packages the integration tests use, when missing and when we can (root + apt).
# Without them those tests skip with a visible reason; CI runs as root and gets them.
set -uo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld slurmd slurm-client munge)
command -v initdb >/dev/null || [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-system-deps: not root or no apt-get; tests needing ${need[*]} will skip" >&2
  exit 0
fi
echo "install-system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/hparray-apt.log 2>&1; then
  apt-get update -q >>/tmp/hparray-apt.log 2>&1
  apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/hparray-apt.log 2>&1 \
    || { echo "install-system-deps: apt-get failed, see /tmp/hparray-apt.log" >&2; tail -5 /tmp/hparray-apt.log >&2; }
fi
exit 0
