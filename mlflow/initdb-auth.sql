-- docker-compose.yaml: the user store of MLflow's basic-auth app (mlflow/basic_auth.ini), next to initdb.sql's
-- databases. Runs on a fresh PostgreSQL volume only; on an existing one:
--   docker compose exec postgres createdb -U cdm mlflow_auth
CREATE DATABASE mlflow_auth;
