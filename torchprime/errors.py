"""Errors that are the user's to fix (config, data, checkpoints), printed as one line."""


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key, the value and what would."""
