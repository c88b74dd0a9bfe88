"""Error types. Every user-facing failure is a :class:`SslrunError` whose message is one line saying what was
wrong and what to do; the CLI prints it without a traceback and exits with status 2."""

from __future__ import annotations


class SslrunError(Exception):
    """Base class for errors that are the user's to fix (bad input, missing data, broken plugin)."""


class ConfigError(SslrunError):
    """An unknown config key, a wrong type or an invalid value."""


class PluginError(SslrunError):
    """Base class for plugin discovery, loading and validation errors."""


class UnknownPluginError(PluginError):
    """A plugin name that no installed distribution registers."""


class DuplicatePluginError(PluginError):
    """Two distributions register the same name in one entry-point group."""


class PluginLoadError(PluginError):
    """Importing a plugin's entry point raised."""


class PluginValidationError(PluginError):
    """A loaded plugin object does not implement the interface for its kind."""


class DataError(SslrunError):
    """A dataset that is missing, corrupt, or does not fit what was asked of it."""


class CheckpointError(SslrunError):
    """A checkpoint that is missing, unreadable or incompatible with the config."""


class TrainingError(SslrunError):
    """Training cannot go on (e.g. a non-finite loss)."""
