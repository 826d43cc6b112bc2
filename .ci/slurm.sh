#!/usr/bin/env bash
# SLURM for the tests in tests/test_slurm.py and tests/test_slurm_multinode.py: the distribution's
# packages, nothing else (iproute2 and util-linux make the two-node cluster's network namespaces).
#
#   .ci/slurm.sh install    # apt-get install slurmctld slurmd slurm-client munge iproute2 (no-op when present)
#   .ci/slurm.sh check      # exit 0 when the binaries the tests need are installed
#
# The packages start no services (and CI has no systemd): the pytest fixture in
# tests/slurm_cluster.py starts a private munged, slurmctld and slurmd(s) and stops them by PID.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge iproute2 util-linux)
BINARIES=(/usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged sbatch scontrol sinfo munge ip nsenter unshare)

have_all() {
    local b
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

# `sbatch --version` needs a slurm.conf; the package version does not.
slurm_version() { dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo "?"; }

install() {
    if have_all; then
        echo "slurm.sh: SLURM $(slurm_version) and munge already installed"
        return 0
    fi
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    local get=("${sudo[@]}" apt-get -qq -o=Dpkg::Use-Pty=0)
    # Refresh the package lists only when apt cannot see the packages (a fresh container has none),
    # or when installing from the lists it has fails (stale lists name files the mirror dropped).
    if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
        "${get[@]}" update
    fi
    if ! "${get[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null; then
        "${get[@]}" update
        "${get[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null
    fi
    have_all || { echo "slurm.sh: installed, but some of ${BINARIES[*]} are missing" >&2; exit 1; }
    echo "slurm.sh: installed SLURM $(slurm_version) and munge"
}

case "${1:-}" in
    install) install ;;
    check) have_all ;;
    *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
