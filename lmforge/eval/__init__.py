"""Evaluations: what each stage achieved, measured on held-out data."""
