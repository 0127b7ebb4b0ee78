"""Model adapters, one file per family."""
