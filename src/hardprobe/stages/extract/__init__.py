"""Feature extraction: features.py runs the backbone over a split into the cache; stage.py
writes the run directory's features, examples skeleton and provenance."""
