"""Clients of the three upstream systems, each behind the `Upstream` protocol in `base`."""
