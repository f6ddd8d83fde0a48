"""What a workspace is, and what every other layer stands on.

Owns: its paths, locks, secret and owner keys (`paths`), atomic private writes and s3:// URLs (`fileio`), small git
commits (`gitrepo`), the exit-code contract (`errors`), its records — the owner record, the one documented place
that keeps a raw owner id (`owner_records`), the keyed append-only ledger (`ledger`) — the Markdown operators read
(`reports`), and the typed context one command loads and passes down (`context`). A revocation's record is the
forgetting layer's (`forgetting.record`).

May import: nothing else of `cdm.platform`, except that `context` opens later layers' clients (the stack, the MLflow
registry, DVC) lazily, inside its properties.
"""
