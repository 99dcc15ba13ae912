"""Standalone prototypes of other gRPC data paths for issue 18.

Measured side by side by `python -m bench.experiments.compare_paths`.
"""
