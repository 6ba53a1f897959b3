"""The two kinds of bad input the CLIs refuse with exit code 2."""
from __future__ import annotations


class ConfigError(ValueError):
    """One or more problems in the experiment file; ``str()`` lists them, a line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class InputError(ValueError):
    """Bad input found past the YAML (no such runs, launch or data): the CLIs exit with code 2."""
