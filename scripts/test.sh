#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (the README's test command; CI runs this).
# The caption metrics run two jars of the COCO caption toolkit (PTB tokenizer, METEOR) with `java`:
# where `java` is missing, Debian's default-jre-headless is installed with apt-get (as root, or
# through sudo). The demo page's test (tests/test_serve_page.py) drives Debian's chromium through
# chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): installed the same way where missing.
set -euo pipefail
cd "$(dirname "$0")/.."

install_java() {
  command -v java >/dev/null && return 0
  local run=(env DEBIAN_FRONTEND=noninteractive)
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "test.sh: 'java' is missing and installing it needs root or sudo: install a Java" \
           "runtime (Debian/Ubuntu: apt-get install default-jre-headless); the caption metrics" \
           "need it." >&2
      return 1
    fi
    run=(sudo "${run[@]}")
  fi
  if ! command -v apt-get >/dev/null; then
    echo "test.sh: 'java' is missing and there is no apt-get: install a Java runtime (>= 8) and" \
         "put 'java' on PATH; the caption metrics need it." >&2
    return 1
  fi
  echo "test.sh: installing default-jre-headless (the caption metrics run Java jars)"
  # Slim Debian images lack this folder, and the JRE's post-install step fails without it.
  "${run[@]}" mkdir -p /usr/share/man/man1
  "${run[@]}" apt-get update -q
  "${run[@]}" apt-get install -y -q --no-install-recommends default-jre-headless
  command -v java >/dev/null || { echo "test.sh: 'java' still missing after the install" >&2; return 1; }
}

install_browser() {
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && return 0
  local run=(env DEBIAN_FRONTEND=noninteractive)
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "test.sh: chromium / chromedriver are missing and installing them needs root or" \
           "sudo: apt-get install chromium chromium-driver (the demo page's test drives them)," \
           "or set PIXELLLM_SKIP_BROWSER_TESTS=1 to skip that test." >&2
      return 1
    fi
    run=(sudo "${run[@]}")
  fi
  if ! command -v apt-get >/dev/null; then
    echo "test.sh: chromium / chromedriver are missing and there is no apt-get: install a" \
         "Chromium and its driver at /usr/bin/chromium and /usr/bin/chromedriver, or set" \
         "PIXELLLM_SKIP_BROWSER_TESTS=1 to skip the demo page's test." >&2
    return 1
  fi
  echo "test.sh: installing chromium and chromium-driver (the demo page's test drives them)"
  "${run[@]}" apt-get update -q
  "${run[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
    echo "test.sh: /usr/bin/chromium or /usr/bin/chromedriver still missing after the install" >&2
    return 1; }
}

install_java
if [ "${PIXELLLM_SKIP_BROWSER_TESTS:-}" != 1 ]; then install_browser; fi
bash scripts/setup_env.sh eval,test,ref
exec .venv/bin/python -m pytest -q -n 2 --durations=40 tests "$@"
