#!/usr/bin/env bash
# Python interpreter used by Bazel's py_* rules (see tools/bazel/BUILD).
#
# Bazel runs this through a runfiles symlink; resolving it leads back to the
# source tree, whose .venv/bin/python (the project's virtualenv, where
# TensorFlow, Keras, pytest ... are installed) is then exec'd. This works for
# any clone location without generated config. KFAC_KERAS_BAZEL_PYTHON (if
# passed with --test_env) overrides the interpreter.
set -eu
self="$(readlink -f "${BASH_SOURCE[0]}")"
repo_root="$(cd "$(dirname "${self}")/../.." && pwd)"
python="${KFAC_KERAS_BAZEL_PYTHON:-${repo_root}/.venv/bin/python}"
if [ ! -x "${python}" ]; then
  echo "venv_python.sh: ${python} not found; create it first:" >&2
  echo "  python3 -m venv .venv && .venv/bin/pip install -e '.[test]'" >&2
  exit 1
fi
exec "${python}" "$@"
