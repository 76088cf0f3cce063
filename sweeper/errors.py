"""Errors a user can act on, and the exit codes the CLI maps them to.

Exit codes (documented in the README):
  0  success
  1  a bug (an unexpected exception; the traceback goes to the log file)
  2  bad input: manifest, override, path, data file, key
  3  a gate failed: the pipeline stopped on a metric threshold, everything written so far is kept
  4  the sweep finished but no trial produced a usable result
  5  integrity: an encrypted file or checkpoint was tampered with, truncated, or the key is wrong
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_GATE = 3
EXIT_NO_RESULT = 4
EXIT_INTEGRITY = 5


class SweeperError(Exception):
    """Base for errors shown to the user as one line, without a traceback."""

    exit_code = EXIT_USER


class UserError(SweeperError):
    """Bad input from the user: a manifest, an override, a path, a key."""


class ManifestError(UserError):
    """One or more problems in a manifest; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source}: {n} problem{'s' if n != 1 else ''}: "
        super().__init__(head + "; ".join(self.problems))


class GateFailed(SweeperError):
    exit_code = EXIT_GATE


class NoResult(SweeperError):
    exit_code = EXIT_NO_RESULT


class IntegrityError(SweeperError):
    """A file failed verification: tampered, truncated, reordered, or decrypted with the wrong key."""

    exit_code = EXIT_INTEGRITY
