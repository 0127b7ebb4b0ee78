"""prune-bench: reproducing structured pruning of Transformers.

`__version__` is the suite's version (the same as pyproject.toml's). It is part of every cell's record hash
(`bench.runner.code_version`): bump it when a change to the harness alters results, so that no record of the
old code is reused.
"""
__version__ = "0.1.0"
