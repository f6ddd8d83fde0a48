"""The exceptions that carry the CLI's exit-code contract (0 success, 2 refused, 1 failure).

Kept apart so that every layer can raise them without importing the layer that maps them to exit codes.
"""

from __future__ import annotations


class WorkspaceError(ValueError):
    """Bad input or a refused request (exit 2). Messages name owners by key, never by raw id, when raised inside a
    flow: Prefect stores a failed state's message in its database."""


class OwnerRevoked(WorkspaceError):
    """The owner revoked consent; nothing of theirs is ingested again until `cdm consent` records a new consent."""


class CommandFailed(Exception):
    """A command that ends with an exit code and still has a result to print (e.g. metrics over a threshold)."""

    def __init__(self, message: str, code: int = 2, result: object = None, text: str = ""):
        super().__init__(message)
        self.code, self.result, self.text = code, result, text
