"""Method adapters, one file per method; `magnitude.py` holds what the magnitude baselines share."""
