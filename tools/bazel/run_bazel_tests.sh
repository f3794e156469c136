#!/usr/bin/env bash
# Bazel check of the project, offline: builds every target (the package, the
# benchmarks library and binaries, every test target) and runs the smoke
# tests (the test files tagged "smoke", see SMOKE_TESTS in
# tools/bazel/defs.bzl). The full suite runs under pytest (.ci/run).
#
#   bash tools/bazel/run_bazel_tests.sh [extra bazel test flags...]
#
# e.g. `--test_tag_filters=-slow` to run all the fast tests under Bazel, or
# `--test_tag_filters=` to run everything. Installs Debian's bazel-bootstrap
# (and bazel-rules-java) with apt when missing, creates .venv when missing,
# and exits with bazel's exit code. Works from any clone location and may be
# run any number of times.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${repo_root}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Bazel itself, and rules_java (used by WORKSPACE from /usr/share/bazel/rules/java).
if ! command -v bazel >/dev/null 2>&1 || [ ! -f /usr/share/bazel/rules/java/WORKSPACE ]; then
  echo "run_bazel_tests.sh: installing bazel-bootstrap and bazel-rules-java with apt" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends bazel-bootstrap bazel-rules-java >/dev/null
fi

# The interpreter bazel's Python toolchain runs (tools/bazel/venv_python.sh).
if ! .venv/bin/python -c "import pytest" >/dev/null 2>&1; then
  echo "run_bazel_tests.sh: setting up .venv" >&2
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q -e ".[test]"
fi

rc=0
# `bazel test` builds every target the pattern matches, runs the filtered tests.
bazel test //... --build_tests_only=false --test_tag_filters=smoke --test_output=errors \
  "$@" || rc=$?

# Under CI leave no bazel server behind.
if [ "${CI:-}" = "true" ]; then
  bazel shutdown >/dev/null 2>&1 || true
fi
exit "${rc}"
