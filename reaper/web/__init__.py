"""The reaper's page on the hub: the hub's OAuth login (login.py), JSON API, /metrics and /health."""
