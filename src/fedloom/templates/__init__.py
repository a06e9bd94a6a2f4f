"""Workspace templates for ``fedloom init``: each folder is a complete workspace."""
