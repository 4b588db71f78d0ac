"""Rank allocation during fine-tuning."""
