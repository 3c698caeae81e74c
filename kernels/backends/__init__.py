"""Scan backends. Each module exposes ``scan(...)`` over the canonical shapes that ``kernels/scan.py`` builds.

Only ``kernels/dispatch.py`` imports them (lazily, so a CPU user never imports Triton).
"""
