"""Helpers shared by every op: backend selection, input checks, memory accounting."""
