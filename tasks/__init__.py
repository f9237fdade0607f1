"""Job stages: plain functions that do the work, each with a thin Celery task wrapper."""
