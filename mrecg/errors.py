"""Errors the user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class UserError(Exception):
    """Bad input (config, paths, checkpoint, device). The message says what to change."""


class ConfigError(UserError):
    """The configuration is malformed or inconsistent."""
