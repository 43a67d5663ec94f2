"""Loading from a local directory or a Hugging Face Hub id, failing fast and in one line when that cannot work.

Without a network, `from_pretrained` / `load_dataset` retry every file with backoff (about 23 s per file,
46 s for one model here). So before loading a hub id we ask the Hub once, with a short timeout:
- `HF_HUB_OFFLINE=1`: no request at all; only the local Hugging Face cache is used;
- the Hub answers that the repo or revision does not exist: a `SmileError` at once;
- the Hub cannot be reached: models fall back to the local cache (`local_files_only=True`); datasets raise,
  pointing at `HF_HUB_OFFLINE=1`, since `datasets` has no per-call cache-only switch.
An http(s) MLflow tracking server is asked the same way (`check_server`) before a sweep starts: MLflow's client
retries for minutes.
"""
from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from smile_ray.errors import SmileError, without_credentials

T = TypeVar("T")
HubState = Literal["ok", "missing", "unreachable", "offline"]

PROBE_TIMEOUT_S = 10.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(source: str) -> bool:
    """Whether `source` can be a hub repo id ("name" or "owner/name") rather than a filesystem path."""
    if source.startswith((".", "~", os.sep)) or ".." in source or source.endswith((".git", ".")):
        return False
    return bool(_REPO_ID.match(source))


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters, for one-line error messages."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def probe_repo(repo_id: str, *, repo_type: str = "model", revision: str | None = None,
               timeout: float = PROBE_TIMEOUT_S) -> tuple[HubState, str]:
    """Ask the Hub once (no retries) whether `repo_id` exists; returns (state, one-line reason)."""
    if huggingface_hub.is_offline_mode():
        return "offline", "HF_HUB_OFFLINE is set"
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=timeout)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and status < 500:
            return "missing", short_reason(exc)
        return "unreachable", f"hub unreachable: {short_reason(exc)}"
    except Exception as exc:  # network-level failures come from several libraries (httpx, ssl, socket)
        return "unreachable", f"hub unreachable: {short_reason(exc)}"
    return "ok", ""


def load_pretrained(load: Callable[..., T], source: str, *, field: str, revision: str | None = None,
                    **kwargs) -> T:
    """`load(source, **kwargs)` for a local directory, or a hub id without hanging offline.

    `load` is a `from_pretrained`-like callable accepting `revision` and `local_files_only`.
    Any failure becomes `SmileError("<field>: cannot load '<source>' (<reason>)")`.
    """
    if os.path.isdir(source):
        return _call(load, source, field, "", **kwargs)
    if not is_hub_id(source):
        raise SmileError(f"{field}: cannot load {source!r} (no such directory)")
    state, reason = probe_repo(source, revision=revision)
    if state == "missing":
        raise SmileError(f"{field}: cannot load {source!r} ({reason})")
    cache_note = "" if state == "ok" else f"{reason}; not in the local Hugging Face cache"
    return _call(load, source, field, cache_note, revision=revision, local_files_only=state != "ok", **kwargs)


def _call(load: Callable[..., T], source: str, field: str, cache_note: str, **kwargs) -> T:
    try:
        return load(source, **kwargs)
    except SmileError:
        raise
    except Exception as exc:  # a loader boundary: every failure is reported as "cannot load", cause chained
        # a cache-only load that fails with OSError means "not cached"; transformers' text for it is long
        reason = cache_note if cache_note and isinstance(exc, OSError) else short_reason(exc)
        raise SmileError(f"{field}: cannot load {source!r} ({reason})") from exc


def quiet_transformers() -> None:
    """Command-line runs: no per-model progress bars or load reports from transformers, errors only."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


# what a local directory of each kind holds: a file that save_pretrained / save_to_disk always writes
LOCAL_MARKERS = {"model": (("config.json",), "a save_pretrained directory"),
                 "model or adapter": (("config.json", "adapter_config.json"),
                                      "a save_pretrained directory or a PEFT adapter directory"),
                 "tokenizer": (("tokenizer.json", "tokenizer_config.json", "spiece.model"), "a tokenizer directory"),
                 "dataset": (("dataset_dict.json", "state.json"), "a datasets save_to_disk directory")}


def check_source(source: str, *, field: str, repo_type: str = "model", revision: str | None = None,
                 local_kind: str | None = None) -> None:
    """Fail fast, before any heavy work, when `source` is neither a local directory nor fetchable from the Hub
    (or already in the local Hugging Face cache when the Hub cannot be reached). A local directory must hold what
    a directory of `local_kind` (default: repo_type) always holds (LOCAL_MARKERS)."""
    if os.path.isdir(source):
        markers, what = LOCAL_MARKERS[local_kind or repo_type]
        if not any(os.path.isfile(os.path.join(source, name)) for name in markers):
            raise SmileError(f"{field}: {source!r} is not {what} (no {' or '.join(markers)})")
        return
    if not is_hub_id(source):
        raise SmileError(f"{field}: no such directory {source!r}")
    state, reason = probe_repo(source, repo_type=repo_type, revision=revision)
    if state == "missing":
        raise SmileError(f"{field}: {source!r} cannot be fetched ({reason})")
    if state != "ok" and not _in_local_cache(source, repo_type, revision):
        raise SmileError(f"{field}: {source!r} cannot be fetched ({reason}) and is not in the local Hugging Face "
                         "cache")


def hub_has_file(repo_id: str, filename: str, *, revision: str | None = None) -> bool:
    """Whether the hub repo holds `filename`: the local cache is asked first, the Hub only when it can be reached."""
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return True
    if huggingface_hub.is_offline_mode():
        return False
    try:
        return huggingface_hub.file_exists(repo_id, filename, revision=revision)
    except Exception:  # an unreachable Hub: the loader will say so in its own line
        return False


def _in_local_cache(repo_id: str, repo_type: str, revision: str | None) -> bool:
    try:
        huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except Exception:  # any failure to resolve from the cache means "not cached"
        return False
    return True


def server_unreachable(tracking_uri: str, timeout: float = 10.0) -> str | None:
    """Why an http(s) tracking URI's server does not answer within `timeout` seconds ("connection refused", "unknown
    host", …), or None when it answers. Any answer counts: an error status, a certificate this probe does not check
    (MLflow verifies with its own settings), a proxy's page. Other URIs are not probed (None)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests
    import urllib3

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout, verify=False).close()
    except requests.exceptions.SSLError:
        return None                                       # it answered, in TLS
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
        text = str(error)
        return (f"no answer within {timeout:g} s" if isinstance(error, requests.exceptions.Timeout)
                else "connection refused" if "refused" in text
                else "unknown host" if "resolve" in text or "Name or service" in text else "cannot connect")
    return None


def check_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """Refuse (SmileError) an http(s) tracking URI whose server does not answer (`server_unreachable`): MLflow's
    client would retry for minutes first."""
    reason = server_unreachable(tracking_uri, timeout)
    if reason is not None:
        raise SmileError(f"MLflow tracking URI {without_credentials(tracking_uri)}: no server answers ({reason}); "
                         f"start one (mlflow server) or choose another --tracking-uri")


@contextlib.contextmanager
def credentials_in_environment(tracking_uri: str) -> Iterator[str]:
    """Yield `tracking_uri` without its user:password@, which go to MLFLOW_TRACKING_USERNAME / _PASSWORD meanwhile
    (MLflow's own way to authenticate; the caller's values are put back afterwards). A sweep keeps the URI without
    them, so nothing it saves holds them: Tune's experiment state pickles the MLflow callback."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.username is None and parts.password is None:
        yield tracking_uri
        return
    names = {"MLFLOW_TRACKING_USERNAME": parts.username, "MLFLOW_TRACKING_PASSWORD": parts.password}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: urllib.parse.unquote(value) for name, value in names.items() if value is not None})
    try:
        yield without_credentials(tracking_uri)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
