"""Errors the user can fix. The CLI prints them as one line on stderr and exits with code 2."""
from typing import Optional


class UserError(Exception):
    """Bad input (config, paths, checkpoint, model, data, device). The message says what to change."""


class NotResumable(UserError):
    """A ``--resume`` that would continue the run on other inputs or settings than it started with."""


class ConfigError(UserError):
    """The configuration is malformed or inconsistent.

    ``key`` is the dotted key the message is about; a section adds its own name in front (``under``) as the
    error travels up, so a check written once reads ``quantize.reconstruction.prob must be ...``. A problem
    with ``{key}`` in it places the key itself; otherwise the key leads (``key problem``, or ``key: problem``
    for a rule over a whole section)."""

    def __init__(self, problem: str, key: Optional[str] = None, whole_section: bool = False):
        self.problem, self.key, self.whole_section = problem, key, whole_section
        super().__init__(self.render())

    def render(self) -> str:
        if self.key is None:
            return self.problem
        if '{key}' in self.problem:
            return self.problem.replace('{key}', self.key)
        return f'{self.key}: {self.problem}' if self.whole_section else f'{self.key} {self.problem}'

    def under(self, path: str) -> 'ConfigError':
        if not path:
            return self
        if self.key is None:
            return ConfigError(self.problem, path, whole_section=True)
        return ConfigError(self.problem, f'{path}.{self.key}', self.whole_section)
