"""The platform: what turns `cdm`'s models into a service a data owner can revoke from (docs/design.md §3-§5).

Six sub-packages, each a layer that imports only the layers before it in `LAYERS` (tests/cdm/platform/test_layout.py
holds the tree to it):

    workspace/   what a workspace is: paths, locks and keys, files and git, records (owners, the ledger),
                 errors, reports, and the typed context one command loads
    stack/       the production stack started on this machine: PostgreSQL, the S3 API on loopback, MLflow's server
    data/        an owner's data in: sources, validation (great-expectations), ingestion, DVC versioning
    models/      models out: weights, the MLflow registry and its cleanup, the serving gate, shards, composites,
                 the shared base, pyfunc serving, the files the DVC pipeline tracks
    evaluation/  the production composite measured: FID, likelihood, memorization, prompt alignment, verdicts
    forgetting/  a revocation carried out and proven, one module per step (its record, logic and writes), the
                 needles and the stores the scan searches, the trace scan

`create.py` sets a new workspace up across all of them (git, DVC, the MLflow store), so it sits above them.
"""

# Lowest first: a module may import, at module level, from its own layer and the layers before it. The one reach
# upward is `workspace/context.py`, which opens the clients of later layers (stack, registry, DVC) inside its
# properties on first use.
LAYERS = ("workspace", "stack", "data", "models", "evaluation", "forgetting")
