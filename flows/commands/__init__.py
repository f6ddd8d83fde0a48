"""What each `cdm` command does: load the workspace's `Context` once, check the request, run flows, and return
`(result for --json, text for people)`. Refusals raise `WorkspaceError` / `CommandFailed` (flows/cli.py maps them).
"""

from flows.commands.ci import ci_report
from flows.commands.data import consent, ingest, ingest_ready, init, pretrain
from flows.commands.models import (compose, compose_ready, evaluate, evaluate_ready, promote, sample, train,
                                   train_ready)
from flows.commands.revocation import finish_revocation, revoke, sign_revocation
from flows.commands.stack import stack_down, stack_up
from flows.commands.workspace import demo, demo_text, serve, status, ui

__all__ = ["ci_report", "compose", "compose_ready", "consent", "demo", "demo_text", "evaluate", "finish_revocation", "evaluate_ready", "ingest", "ingest_ready", "init", "pretrain", "promote", "revoke", "sign_revocation",
           "sample", "serve", "stack_down", "stack_up", "status", "train", "train_ready", "ui"]
