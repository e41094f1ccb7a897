"""Benchmarks: a loopback JupyterHub 6 simulator (hubsim) and the runner that compares sweeps (run)."""
