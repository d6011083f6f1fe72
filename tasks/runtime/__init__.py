"""Where a stage runs: in-process, as a `stage/gpu` deployment run, or under `accelerate launch`."""
