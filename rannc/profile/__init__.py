"""Profiling: measured (or estimated) time and memory of every block, and communication speed."""
