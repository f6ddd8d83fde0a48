"""A revocation carried out and proven: the typed state machine of its steps (`unlearn`), every store cdm writes
and the purge of Prefect's log lines (`stores`), the trace scan (`scan`), and the verification a certificate rests
on (`verification`).

May import: every other layer.
"""
