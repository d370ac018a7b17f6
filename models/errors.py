"""The error a config that cannot describe a model raises (its own module so every models/ file can raise it
without importing the YAML reader)."""


class ConfigError(ValueError):
    """A config file that cannot describe a model we can build."""
