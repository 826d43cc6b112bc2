#!/usr/bin/env bash
# What tests/test_serve.py's browser tests need: Debian's chromium and chromedriver (one source
# package, so their versions always match); the selenium package that drives them is in the
# project's `dev` extra.
# The tests hand selenium both paths, so its Selenium Manager never downloads anything, and they
# start chromium with every background service off: all traffic stays on 127.0.0.1.
#     .ci/browser.sh && make test
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
chromium --version
chromedriver --version
