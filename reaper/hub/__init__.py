"""The JupyterHub adapter: the REST client (listing, stop, route table) and the probes of the
single-user servers."""

from .client import (
    NO_TRACK,
    PAGINATION_MEDIA_TYPE,
    HubClient,
    HubError,
    HubListingError,
    StopResult,
    parse_time,
    quote_segment,
    server_from_model,
    servers_from_user,
)

__all__ = [
    "NO_TRACK",
    "PAGINATION_MEDIA_TYPE",
    "HubClient",
    "HubError",
    "HubListingError",
    "StopResult",
    "parse_time",
    "quote_segment",
    "server_from_model",
    "servers_from_user",
]
