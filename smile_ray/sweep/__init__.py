"""A SMILE sweep on Ray Tune, in parts: `driver` (run_sweep: checks, SVD prefill, the Tuner, summary.json),
`workers` (what runs on Ray workers), `tuner` (the Tuner), `record` (--output, sweep.json, resume checks),
`summary` (summary.json, the ranked table), `progress` (the live table). `smile_ray.tune` is its command line."""
