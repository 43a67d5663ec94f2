"""MLflow writes that a tracking server could not take, held on disk and delivered in order once it answers again.

A sweep's callback writes through `TrackingWriter`. While the server answers, every write goes straight to it. When a
write fails and the server's /health does not answer either (stopped, restarting, unreachable), that write and every
later one are appended to `<outbox>/journal.jsonl` (figures as files beside it), the sweep goes on, and the writer
looks for the server again at most every `RETRY_SECONDS`. When it answers, the journal is delivered in order and
removed. A write the server refuses while it answers (a bad value) is an error, as before: it is not held.

Exactly once: after each delivered record the count in `<outbox>/delivered` is advanced (written atomically), so a
delivery cut short resumes after the last record the server took. The one record that could be taken twice, the
one in flight when the delivery was cut, is harmless for every write but run creation (MLflow keeps one copy of a
metric logged twice with the same step and time; params, tags and artifacts are set, not added). A run created
while the server was away gets a placeholder id; before creating it on delivery the writer looks for a run that
already carries the same parent and `trial_id`, and maps the placeholder to it (`ids.json`) instead of creating a
second one.

Only http(s) tracking URIs are held: a local store (sqlite) has no server to wait for.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from smile_ray.errors import without_credentials
from smile_ray.files import write_json
from smile_ray.hub import server_unreachable

logger = logging.getLogger(__name__)

RETRY_SECONDS = 5.0                  # how often a writer holding records looks for the server


PROBE_SECONDS = 3.0                  # how long a look for the server waits for its answer


PLACEHOLDER = "pending-"             # run ids handed out while the server was away


JOURNAL, DELIVERED, IDS, FILES = "journal.jsonl", "delivered", "ids.json", "files"


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


class TrackingWriter:
    """The MLflow writes of a sweep's driver (the `MlflowClient` methods of the same names), held in `directory`
    while the tracking server does not answer (see the module docstring). `directory` None: never held."""

    def __init__(self, tracking_uri: str, directory: str | os.PathLike | None) -> None:
        self.tracking_uri = tracking_uri
        self.directory = Path(directory) if directory is not None and is_remote(tracking_uri) else None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._next_attempt = 0.0

    # -- what is held ----------------------------------------------------------------------------------------------

    def _records(self) -> list[dict[str, Any]]:
        if self.directory is None or not (self.directory / JOURNAL).is_file():
            return []
        lines = (self.directory / JOURNAL).read_text(encoding="utf-8").splitlines()
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:        # a line cut by a crash mid-append (never delivered, never counted)
                continue
        return records[self._delivered():]

    def _delivered(self) -> int:
        path = self.directory / DELIVERED
        return json.loads(path.read_text())["records"] if path.is_file() else 0

    @property
    def held(self) -> int:
        """How many records wait for the server."""
        return len(self._records())

    @property
    def holding(self) -> bool:
        """Whether records wait for the server (the journal exists until every record is delivered): what each
        write asks, without reading the journal."""
        return self.directory is not None and (self.directory / JOURNAL).is_file()

    def _ids(self) -> dict[str, str]:
        path = None if self.directory is None else self.directory / IDS
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}

    def resolve(self, run_id: str) -> str:
        """The server's id for `run_id` (a placeholder once its run was delivered; any other id as it is)."""
        return self._ids().get(run_id, run_id) if run_id.startswith(PLACEHOLDER) else run_id

    def _resolved(self, value: Any) -> Any:
        """`value` with every placeholder in it (a string, in lists and mappings) replaced by its run's id."""
        if isinstance(value, str):
            return self.resolve(value)
        if isinstance(value, list):
            return [self._resolved(item) for item in value]
        if isinstance(value, dict):
            return {key: self._resolved(item) for key, item in value.items()}
        return value

    # -- writes ----------------------------------------------------------------------------------------------------

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        placeholder = f"{PLACEHOLDER}{uuid.uuid4().hex}"
        created = self._write({"op": "create_run", "placeholder": placeholder, "experiment_id": experiment_id,
                               "run_name": run_name, "tags": dict(tags)})
        return created or placeholder

    def log_batch(self, run_id: str, metrics: Iterable[Metric] = (), params: Iterable[Param] = (),
                  tags: Iterable[RunTag] = ()) -> None:
        self._write({"op": "log_batch", "run_id": run_id,
                     "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                     "params": [[p.key, p.value] for p in params], "tags": [[t.key, t.value] for t in tags]})

    def log_dict(self, run_id: str, dictionary: Any, artifact_file: str) -> None:
        self._write({"op": "log_dict", "run_id": run_id, "dictionary": dictionary, "artifact_file": artifact_file})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write({"op": "log_text", "run_id": run_id, "text": text, "artifact_file": artifact_file})

    def log_table(self, run_id: str, data: Mapping[str, list], artifact_file: str) -> None:
        self._write({"op": "log_table", "run_id": run_id, "data": dict(data), "artifact_file": artifact_file})

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """The figure as a PNG (kept as a file while held)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            figure.savefig(path)
            self._write({"op": "log_artifact", "run_id": run_id, "file": str(path),
                         "artifact_path": str(Path(artifact_file).parent).removeprefix(".") or None})

    def set_terminated(self, run_id: str, status: str) -> None:
        self._write({"op": "set_terminated", "run_id": run_id, "status": status})

    def update_run(self, run_id: str, status: str) -> None:
        self._write({"op": "update_run", "run_id": run_id, "status": status})

    def delete_tag(self, run_id: str, key: str) -> None:
        self._write({"op": "delete_tag", "run_id": run_id, "key": key})

    def _write(self, record: dict[str, Any]) -> str | None:
        """Apply `record` now, or hold it: when records are already held (order), or when it fails and the server
        does not answer. Returns what a `create_run` created (None when held)."""
        if self.holding:
            self._hold(record)
            self.deliver_if_due()
            return None
        try:
            return self._apply(record)
        except Exception:
            reason = None if self.directory is None else server_unreachable(self.tracking_uri, PROBE_SECONDS)
            if reason is None:
                raise                             # the server answers: the write itself is wrong
            logger.warning("MLflow tracking server %s does not answer (%s): holding its records in %s until it does",
                           without_credentials(self.tracking_uri), reason, self.directory)
            self._hold(record)
            self._next_attempt = time.monotonic() + RETRY_SECONDS
            return None

    def _hold(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if "file" in record:                       # a temporary file: moved into the outbox
            kept = self.directory / FILES / uuid.uuid4().hex / Path(record["file"]).name
            kept.parent.mkdir(parents=True)
            shutil.move(record["file"], kept)
            record = {**record, "file": str(kept.relative_to(self.directory))}
        with open(self.directory / JOURNAL, "a+", encoding="utf-8") as journal:
            journal.seek(0, os.SEEK_END)
            if journal.tell():                      # after a line cut by a crash, start a line of its own
                journal.seek(journal.tell() - 1)
                cut = journal.read(1) != "\n"
                journal.seek(0, os.SEEK_END)
                journal.write("\n" if cut else "")
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            os.fsync(journal.fileno())

    def _apply(self, record: dict[str, Any], replay: bool = False) -> str | None:
        op = record["op"]
        args = {key: value if key == "placeholder" else self._resolved(value)       # run ids in tags and files too
                for key, value in record.items() if key != "op"}
        if op == "create_run":
            return self._create_run(**args, replay=replay)
        if op == "log_batch":
            self.client.log_batch(args["run_id"], metrics=[Metric(*m) for m in args["metrics"]],
                                  params=[Param(*p) for p in args["params"]],
                                  tags=[RunTag(*t) for t in args["tags"]])
        elif op == "log_table" and replay and self._has_artifact(args["run_id"], args["artifact_file"]):
            pass                                   # MLflow appends a table logged twice; this product logs each once
        elif op == "log_artifact":
            path = Path(args["file"])
            self.client.log_artifact(args["run_id"], str(path if path.is_absolute() else self.directory / path),
                                     args["artifact_path"])
        else:
            getattr(self.client, op)(**args)
        return None

    def _has_artifact(self, run_id: str, artifact_file: str) -> bool:
        directory = str(Path(artifact_file).parent).removeprefix(".") or None
        return artifact_file in {info.path for info in self.client.list_artifacts(run_id, directory)}

    def _create_run(self, placeholder: str, experiment_id: str, run_name: str, tags: dict[str, str],
                    replay: bool) -> str:
        existing = self._existing_child(experiment_id, tags) if replay else None
        run_id = existing or self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        if self.directory is not None:
            write_json({**self._ids(), placeholder: run_id}, self.directory / IDS)
        return run_id

    def _existing_child(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        """A run with the same parent and trial id, created by a delivery that was cut short (asked on delivery only:
        a run created directly has no placeholder to map)."""
        if MLFLOW_PARENT_RUN_ID not in tags or "trial_id" not in tags:
            return None
        query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{tags[MLFLOW_PARENT_RUN_ID]}' AND tags.trial_id = '{tags['trial_id']}'"
        found = self.client.search_runs([experiment_id], filter_string=query, max_results=1)
        return found[0].info.run_id if found else None

    # -- delivery --------------------------------------------------------------------------------------------------

    def deliver_if_due(self) -> None:
        """`deliver` when records are held and the last attempt is `RETRY_SECONDS` old."""
        if time.monotonic() >= self._next_attempt and self.holding:
            self.deliver()

    def deliver(self) -> bool:
        """Deliver the held records in order, if the server answers; True when none is left."""
        records = self._records()
        if not records:
            if self.holding:
                self._clear()                      # all delivered, then cut short before the journal went
            return True
        self._next_attempt = time.monotonic() + RETRY_SECONDS
        if server_unreachable(self.tracking_uri, PROBE_SECONDS) is not None:
            return False
        done = self._delivered()
        for record in records:
            try:
                self._apply(record, replay=True)
            except Exception:
                if server_unreachable(self.tracking_uri, PROBE_SECONDS) is not None:
                    return False                   # gone again: the rest waits for the next attempt
                raise
            done += 1
            write_json({"records": done}, self.directory / DELIVERED)
        self._clear()
        logger.warning("MLflow tracking server %s answers again: %d held records delivered",
                       without_credentials(self.tracking_uri), len(records))
        return True

    def _clear(self) -> None:
        """Everything delivered: the journal, its count and its files go; ids.json stays (a resumed sweep's
        callback state may still hold placeholders)."""
        for name in (JOURNAL, DELIVERED):
            (self.directory / name).unlink(missing_ok=True)
        shutil.rmtree(self.directory / FILES, ignore_errors=True)
