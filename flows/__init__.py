"""Prefect flows: the retrain pipeline, the promotion gate and the deployments."""
