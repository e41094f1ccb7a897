"""The reaper's page on the hub: JupyterHub's HubOAuth login (auth.py), JSON API, /metrics and /health."""
