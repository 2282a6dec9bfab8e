"""Helpers every stage uses: one-line errors for the commands, and atomic file writes."""
