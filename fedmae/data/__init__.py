"""Data: the built-in synthetic multi-hospital generator and its loaders."""
