"""Data: readers for every record format, corpus cleaning (filters, dedup, decontamination,
mixing), token shards and per-stage datasets."""
