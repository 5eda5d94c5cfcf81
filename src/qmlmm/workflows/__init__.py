"""Workflows: parallel labelling, end-to-end recipes."""
