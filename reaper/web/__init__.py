"""The reaper's page on the hub: HubOAuth login, JSON API, /metrics and /health."""
