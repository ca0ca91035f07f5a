"""Prefect flows, their parameter models and the `pivotmap` command line."""
