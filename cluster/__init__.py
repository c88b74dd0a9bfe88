"""Ray layer: the launcher (driver side), the worker entry and cluster configs. Imports Ray; core never does."""
