"""Capture of a model's forward as an fx graph, and its cut into blocks and stage modules."""
