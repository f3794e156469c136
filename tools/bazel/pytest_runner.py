"""Run one test file through pytest inside `bazel test`.

Usage (from a py_test made by tools/bazel/defs.bzl): pytest_runner.py TEST_FILE

The test file is resolved from its runfiles symlink back to the source tree,
and pytest runs there from the repository root, exactly as the README's
`.venv/bin/python -m pytest tests` does (same conftest.py files, same pytest
configuration, repo root first on sys.path).
"""

import os
import sys


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: pytest_runner.py TEST_FILE\n")
        return 2
    repo_root = os.path.dirname(
        os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    test_file = os.path.realpath(argv[1])

    sys.path.insert(0, repo_root)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in [repo_root, os.environ.get("PYTHONPATH", "")] if p)
    # Keep state that pytest/hypothesis would write into the repo inside the
    # test's own scratch directory instead.
    tmp = os.environ.get("TEST_TMPDIR")
    if tmp:
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                              os.path.join(tmp, ".hypothesis"))
    os.chdir(repo_root)

    import pytest  # pylint: disable=import-outside-toplevel

    args = [test_file, "-q", "-p", "no:cacheprovider"]
    xml_out = os.environ.get("XML_OUTPUT_FILE")
    if xml_out:
        args.append("--junitxml=" + xml_out)
    # Exit code 5 (no tests collected) is a failure, like any non-zero code.
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
