"""Prefect flows and deployments that call shards, pipelines and training; the CLI."""
