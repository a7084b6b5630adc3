"""The application layer: recipes, the runner, run checkpoints, comparisons, the demo and the CLI.

Nothing in the library imports this package; it is where rich and PyYAML are used.
"""
