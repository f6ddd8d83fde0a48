"""The production stack of a workspace, started on this machine (`cdm stack up`): PostgreSQL for MLflow and
Prefect, an S3 API on loopback with its access checks on (`s3_server`), an MLflow tracking server with basic auth
(`services`).

May import: `workspace`.
"""
