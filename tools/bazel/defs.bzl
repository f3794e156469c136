"""Macros that turn the project's pytest files and benchmark commands into Bazel targets."""

# A test file whose name contains one of these is tagged "slow".
SLOW_MARKERS = ["slow", "_examples", "notebook", "distributed"]

# The test files tagged "smoke": what CI runs under `bazel test`
# (tools/bazel/run_bazel_tests.sh), after pytest has run the whole suite. One
# checks the package/benchmarks split, one is a small piece of the maths.
SMOKE_TESTS = ["tests/test_package_layout.py", "tests/test_linalg.py"]

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
        tags = tags + (["slow"] if slow else []) + (["smoke"] if src in SMOKE_TESTS else []),
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
    for src in SMOKE_TESTS:
        if src not in srcs:
            fail("SMOKE_TESTS names %s, which is not among the test files" % src)
    for src in srcs:
        pytest_test(
            name = _target_name(src),
            src = src,
            **kwargs
        )

def benchmark_binaries(commands, deps = []):
    """One py_binary per benchmark command: "autoencoder" -> //:autoencoder_benchmark,
    running benchmarks/autoencoder.py (as `python -m benchmarks.autoencoder` does)."""
    for command in commands:
        native.py_binary(
            name = command + "_benchmark",
            srcs = ["benchmarks/%s.py" % command],
            main = "benchmarks/%s.py" % command,
            deps = deps,
            python_version = "PY3",
            srcs_version = "PY3",
        )
