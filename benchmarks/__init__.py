"""Benchmarks, data loaders and notebook helpers for kfac_keras (not installed).

This folder is not part of the installed ``kfac_keras`` package: run its
commands from the repository root, e.g. ``python -m benchmarks.autoencoder
--quick``. ``benchmarks/README.md`` lists every command and what it measures.
"""
