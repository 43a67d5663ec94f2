"""Files the product writes: atomic, with a plain new file's permissions."""
import json
import os
import stat

import pytest
import torch

from smile_ray.files import current_umask, write_json


def test_write_json_is_atomic_and_replaces(tmp_path):
    report = {"model_info": {"all_params": 2}, "timings": {"eval_seconds": 1.0}}
    path = tmp_path / "runs" / "trial_0" / "report.json"
    assert write_json(report, path) == path
    assert json.loads(path.read_text()) == report
    write_json({**report, "timings": {"eval_seconds": 2.0}}, path)
    assert json.loads(path.read_text())["timings"] == {"eval_seconds": 2.0}
    with pytest.raises(TypeError):
        write_json({**report, "model_info": {"weights": torch.zeros(1)}}, path)  # not JSON: fails mid-write
    assert json.loads(path.read_text())["timings"] == {"eval_seconds": 2.0}  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temp file left behind


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_write_json_gives_a_plain_files_permissions(tmp_path, umask):
    # mkstemp's 0o600 must not survive the rename: shared storage needs what open(path, "w") would give
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        path = write_json({"a": 1}, tmp_path / "reports" / "r.json")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert json.loads(path.read_text()) == {"a": 1}
