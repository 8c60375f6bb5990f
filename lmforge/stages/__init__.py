"""One module per stage, each a straight line from config to artifact directory.

Every stage exposes `run(cfg: RunConfig, run_dir: Path, **options) -> dict` that writes
DIR/<stage>/ and returns the stage's summary.
"""
