"""`python -m smile_ray.sync --output DIR`: deliver the MLflow records a sweep held for its tracking server.

A sweep whose tracking server stopped answering, and did not come back before the sweep ended, keeps what the server
did not take in DIR/mlflow_outbox and exits with status 3 (`smile_ray.tune`). Once the server answers, this command
delivers the records in order, once each (`smile_ray.outbox`), and fills summary.json's MLflow run ids.
Exit status: 0 delivered (or nothing held), 2 no sweep in DIR, 3 the server still does not answer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smile_ray.cli import finish
from smile_ray.errors import SmileError, user_message, without_credentials
from smile_ray.files import write_json
from smile_ray.sweep.record import HELD_EXIT, OUTBOX_DIR, SUMMARY_FILE, read_record


def sync(output: Path, tracking_uri: str | None = None) -> int:
    """Deliver what the sweep in `output` held; returns how many records are still held. `tracking_uri`: the
    sweep's store with credentials (the one sweep.json records has none)."""
    from smile_ray.mlflow_runs import find_sweep
    from smile_ray.outbox import TrackingWriter

    record = read_record(output)
    if "tracking_uri" not in record:
        raise SmileError(f"--output {output}: no sweep there (no sweep.json)")
    if tracking_uri is None or without_credentials(tracking_uri) != record["tracking_uri"]:
        tracking_uri = record["tracking_uri"]
    writer = TrackingWriter(tracking_uri, output / OUTBOX_DIR)
    if not writer.deliver():
        return writer.held
    summary_path = output / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        runs = find_sweep(tracking_uri, record["experiment"], str(output))
        if runs is not None:
            for trial in summary["trials"]:
                trial["mlflow_run_id"] = runs.run_ids.get(trial["trial_id"])
            summary["mlflow"].update(experiment_id=runs.experiment_id, parent_run_id=runs.parent_run_id)
        summary["mlflow"]["held_records"] = 0
        write_json(summary, summary_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smile_ray.sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="the sweep's --output directory")
    parser.add_argument("--tracking-uri", help="the sweep's tracking URI with credentials, if it needs them "
                                                "(default: the one sweep.json records)")
    args = parser.parse_args(argv)
    output = Path(args.output).resolve()
    try:
        held = sync(output, args.tracking_uri)
    except SmileError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2
    except Exception as error:      # the server refused a record: one line, status 1
        print(f"error: delivery failed: {type(error).__name__}: {user_message(error)}", file=sys.stderr)
        return 1
    if held:
        print(f"error: the MLflow tracking server of {output} does not answer; {held} records still held in "
              f"{output / OUTBOX_DIR}", file=sys.stderr)
        return HELD_EXIT
    print(f"MLflow records of {output} delivered; summary.json updated")
    return 0


if __name__ == "__main__":
    finish(main())
