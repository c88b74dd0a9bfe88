"""An example third-party sslrun plugin package (see docs/plugins.md)."""
