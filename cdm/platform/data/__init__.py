"""An owner's data in: reading a source, a folder or `s3://` (`sources`), validating a batch with
great-expectations (`validation`), committing it atomically (`ingest`), and versioning `data/` with DVC, including
the targeted deletion a revocation needs (`dvc`).

May import: `workspace`, `stack`.
"""
