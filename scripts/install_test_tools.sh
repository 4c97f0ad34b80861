#!/usr/bin/env bash
# Installs what the test suite needs outside Python: Debian's Chromium, for the
# kedro-viz browser test. Skips the install when Chromium is already there; when it
# cannot be installed (not root, no apt-get), says so and the browser test is skipped
# with that reason.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_tools: Chromium is absent and cannot be installed here (needs root and apt-get); the kedro-viz browser test will be skipped."
  exit 0
fi
echo "install_test_tools: installing Debian's chromium for the kedro-viz browser test..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
  || echo "install_test_tools: apt-get could not install chromium; the kedro-viz browser test will be skipped."
