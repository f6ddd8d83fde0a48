"""A revocation carried out and proven, one module per step (docs/design.md §5):

    record            the record's schema (`Revocation`, one typed output per step), its writes, the runner lock
    begin             the request accepted (or resumed)
    plan              which of the owner's shards drop and which retrain
    go_live           the owner leaves the shard plan; production without every shard that saw them
    retrain           shared shards retrain without the owner; production gets them back
    forgetting_check  the membership attack before and after, with its control
    purge             the intent recorded, then every store's copy of the owner deleted
    verification      `verify`: the registry, DVC and every store scanned for the needles
    reevaluate        the composite served after, measured
    certify           the certificate, the ledger entry and its anchor; `complete`

Each step module holds its logic, its writes and fault points, and `run`, which records its output through
`record.recorded`. `record` imports no step, and every step imports it: no circle. Beside them: `needles` (what the
scan looks for, taken at `begin`), `stores` (every store cdm writes, and the purge of Prefect's log lines) and
`scan` (the byte and pixel search).

May import: every other layer.
"""
