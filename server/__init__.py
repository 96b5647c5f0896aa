"""Latent Edit local server: aiohttp + msgpack over ``core`` (see docs/protocol.md)."""

__version__ = "0.1.0"
