"""Macros that turn the project's pytest files into Bazel tests."""

# A test file whose name contains one of these is tagged "slow";
# CI runs `bazel test //... --test_tag_filters=-slow`.
SLOW_MARKERS = ["slow", "_examples", "notebook", "distributed"]

def is_slow(test_file):
    name = test_file.split("/")[-1]
    for marker in SLOW_MARKERS:
        if marker in name:
            return True
    return False

def pytest_test(name, src, deps = [], data = [], tags = [], size = None, **kwargs):
    """One py_test that runs the pytest file `src` via tools/bazel/pytest_runner.py."""
    slow = is_slow(src)
    native.py_test(
        name = name,
        main = "//tools/bazel:pytest_runner.py",
        srcs = ["//tools/bazel:pytest_runner.py", src],
        args = ["$(rootpath %s)" % src],
        deps = deps,
        data = data,
        python_version = "PY3",
        srcs_version = "PY3",
        size = size or ("enormous" if slow else "large"),
        tags = tags + (["slow"] if slow else []),
        **kwargs
    )

def _target_name(src):
    """tests/test_foo.py -> "test_foo"; tests/sub/test_bar.py -> "sub/test_bar"."""
    name = src[:-len(".py")] if src.endswith(".py") else src
    if name.startswith("tests/"):
        name = name[len("tests/"):]
    return name

def pytest_tests(srcs, **kwargs):
    """One pytest_test per file in `srcs`, named after the file (see _target_name)."""
    for src in srcs:
        pytest_test(
            name = _target_name(src),
            src = src,
            **kwargs
        )
