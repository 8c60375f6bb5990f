"""Data: readers for every record format, token shards and per-stage datasets."""
