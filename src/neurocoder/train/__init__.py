"""Trainers: one loop per kind of work."""
