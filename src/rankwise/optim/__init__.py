"""Optimizers for adapters."""
