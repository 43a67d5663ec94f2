"""The shipped search spaces (*.yaml), installed as the package `smile_ray.search_spaces` (see pyproject.toml).

This file makes the folder a regular package, so `importlib.resources.files` gives a plain directory in wheels
and editable installs alike; `smile_ray.spec.resolve_space_path` looks here for `--space NAME`.
"""
