"""The production stack on one host: PostgreSQL, an S3-compatible object store, the MLflow
server, the Prefect server with a worker, and the inference service, as processes."""
