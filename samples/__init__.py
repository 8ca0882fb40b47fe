"""Reference models and small apps; importable as ``samples.<module>`` from the repo root."""
