"""Reliability tests: faults, crashes, bad input, slow readers, provider and disk trouble, secrets.

The short variants run in CI with the rest of the suite; `python -m tests.reliability.soak` runs the
long ones. docs/reliability.md has the figures and how to reproduce them.
"""
