"""Running a deployment: the pipeline schedule, gradient all-reduce, the patched optimizer, and
global state dicts."""
