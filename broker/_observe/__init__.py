"""Metrics, status, logging and readiness."""
