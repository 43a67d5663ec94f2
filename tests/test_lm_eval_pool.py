"""`task_pool: {kind: lm_eval}`: lm-eval tasks evaluated in-process on the upscaled causal LM, reported per task with
lm-eval's numbers; task names, metrics and include paths checked before anything loads, in run and sweep alike."""
import json

import pytest
import yaml

from smile_ray import run, tune
from smile_ray.errors import SmileError
from smile_ray.kinds import parse_pool
from smile_ray.kinds.lm_eval import metric_label
from tests.lm_fixtures import save_causal_pool, save_lm_eval_tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    return save_causal_pool(root / "pool", experts=2), save_lm_eval_tasks(root / "tasks")


def space(setup, **task_pool) -> dict:
    pool, tasks = setup
    return {"model_pool": {"kind": "causal_lm", "base": str(pool["base"]),
                           "experts": {n: str(d) for n, d in pool["experts"].items()}},
            "task_pool": {"kind": "lm_eval", "include_path": str(tasks), "batch_size": 4,
                          "tasks": [{"name": "tiny_gen", "metric": "exact_match"}, {"name": "tiny_mc",
                                                                                     "metric": "acc_norm"}],
                          **task_pool},
            "method": {"name": "smile", "gate_k": 4, "k": 8}}


def write(tmp_path, config) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_metric_labels_are_mlflow_names():
    assert metric_label("exact_match,flexible-extract") == "exact_match.flexible-extract"
    assert metric_label("exact_match,flexible-extract", stderr=True) == "exact_match_stderr.flexible-extract"
    assert metric_label("acc_norm") == metric_label("acc_norm,none") == "acc_norm"


def test_run_reports_each_task_with_lm_eval_s_numbers(setup, tmp_path, capsys):
    assert run.main(["--config", write(tmp_path, space(setup, limit=6)), "--report", str(tmp_path / "r.json"),
                     "--no-svd-cache"]) == 0
    out = capsys.readouterr().out
    assert "tiny_gen" in out and "tiny_mc" in out and "(6 samples" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["tiny_gen"]) == {"exact_match", "exact_match_stderr"}
    assert set(report["tiny_mc"]) == {"acc_norm", "acc_norm_stderr"}
    assert 0 <= report["tiny_mc"]["acc_norm"] <= 1 and report["tiny_mc"]["acc_norm_stderr"] > 0
    assert report["average"]["score"] == pytest.approx((report["tiny_gen"]["exact_match"]
                                                        + report["tiny_mc"]["acc_norm"]) / 2)


def test_the_numbers_are_lm_eval_s_own(setup, tmp_path):
    """The pool's acc_norm equals lm_eval.simple_evaluate on the same model object."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from smile_ray.trial import build_pools, run_trial

    config = space(setup, limit=8, tasks=[{"name": "tiny_mc", "metric": "acc_norm"}])
    config["method"] = {"name": "individual", "model": "expert0"}
    report = run_trial(config)
    pools = build_pools(config)
    model = pools.models.load_expert("expert0").instantiate()
    lm = HFLM(pretrained=model, tokenizer=pools.models.load_tokenizer(), batch_size=4, device="cpu")
    direct = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], limit=8,
                                     task_manager=TaskManager(include_path=str(setup[1]), include_defaults=False))
    assert report["tiny_mc"]["acc_norm"] == direct["results"]["tiny_mc"]["acc_norm,none"]


BAD = {   # task_pool override → the one line
    "unknown_task": ({"tasks": ["tiny_mcq"]},
                     "task_pool.tasks[0]: lm-eval has no task 'tiny_mcq'; did you mean tiny_mc, tinyArc, tiny_gen?"),
    "unknown_metric": ({"tasks": [{"name": "tiny_mc", "metric": "f1"}]},
                       "task_pool.tasks[0].metric: task tiny_mc reports acc, acc_norm, not 'f1'"),
    "unknown_filter": ({"tasks": [{"name": "tiny_gen", "metric": "exact_match,flexible-extract"}]},
                       "task_pool.tasks[0].metric: task tiny_gen filters its outputs by none, not 'flexible-extract'"),
    "no_include_path": ({"include_path": "/nonexistent/tasks"},
                        "task_pool.include_path: no such directory '/nonexistent/tasks'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tasks_are_refused_alike_by_run_and_by_a_sweep(case, setup, tmp_path, capsys):
    override, message = BAD[case]
    config = write(tmp_path, space(setup, **override))
    said = {}
    assert run.main(["--config", config]) == 2
    said["run"] = capsys.readouterr().err.strip()
    assert tune.main(["--space", config, "--output", str(tmp_path / "out"),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    said["sweep"] = capsys.readouterr().err.strip()
    assert said["run"] == said["sweep"] == f"error: {message}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_hub_task_is_refused_in_one_line_when_the_hub_is_unreachable(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = parse_pool({"kind": "lm_eval", "tasks": [{"name": "gsm8k", "metric": "exact_match,flexible-extract"}]},
                        "task_pool")
    with pytest.raises(SmileError, match=r"^task_pool.tasks\[0\] \(gsm8k\): dataset: 'openai/gsm8k' cannot be fetched"):
        config.check()

