"""Search spaces: parsing, validation errors naming the key path, Tune param spaces, the SVD plan."""
import re
from pathlib import Path

import pytest
from ray import tune

from smile_ray import SmileError
from smile_ray.spec import (SEARCH_SPACES_DIR, Sampled, apply_overrides, first_difference, load_space,
                            parse_space, resolve_space_path)

POOLS = {"model_pool": {"kind": "embedded"}, "task_pool": {"kind": "embedded"}}


def space(method, **sections):
    return parse_space({**POOLS, "method": method, **sections}, "test")


def test_grids_expand_in_order_with_defaults_filled():
    spec = space({"name": "smile", "gate_k": [4, 16], "k": {"grid": [8, -1]}})
    assert spec.grid_points() == [
        {"name": "smile", "gate_k": g, "k": k, "top_k": 1, "routing_use_diff": True, "average_experts": False,
         "targets": None, "experts": None, "svd_solver": "exact"} for g in (4, 16) for k in (8, -1)]
    domain = spec.param_space()["method"]
    assert domain["gate_k"] == tune.grid_search([4, 16]) and domain["top_k"] == 1


def test_several_method_blocks_become_one_grid():
    spec = space([{"name": "simple_average"}, {"name": "smile", "gate_k": 2, "k": [4, 8]}])
    points = spec.param_space()["method"]["grid_search"]
    assert [p["name"] for p in points] == ["simple_average", "smile", "smile"]


def test_random_and_optuna_spaces_sample():
    spec = space({"name": "smile", "gate_k": {"randint": [1, 33]}, "k": {"choice": [8, 32]}},
                 search={"algorithm": "random", "num_samples": 5})
    method = spec.param_space()["method"]
    assert isinstance(method["gate_k"], tune.search.sample.Integer) and spec.searched
    optuna = space({"name": "smile", "gate_k": [4, 8], "k": 4}, search={"algorithm": "optuna"})
    assert isinstance(optuna.param_space()["method"]["gate_k"], tune.search.sample.Categorical)


def test_prefill_plan_takes_the_largest_ranks_per_routing_variant_and_what_projection_needs():
    spec = space([{"name": "smile", "gate_k": [4, 16], "k": [8, -1]},
                  {"name": "smile", "gate_k": 2, "k": [64], "routing_use_diff": False},
                  {"name": "smile", "gate_k": 4, "k": 4, "svd_solver": "randomized"},
                  {"name": "projection", "model": "digit"}])
    exact = {"svd_solver": "exact"}
    assert spec.prefill_plan() == [("smile", {"routing_use_diff": True, **exact, "gate_k": 16, "k": 8}, True),
                                   ("smile", {"routing_use_diff": False, **exact, "gate_k": 2, "k": 64}, True),
                                   ("smile", {"routing_use_diff": True, "svd_solver": "randomized", "gate_k": 4,
                                              "k": 4}, True),
                                   ("projection", {}, False)]
    assert space({"name": "simple_average"}).prefill_plan() == []
    assert Sampled("randint", (1, 33)).largest() == 32
    sampled = space({"name": "smile", "gate_k": {"randint": [1, 33]}, "k": 4}, search={"algorithm": "random"})
    assert sampled.prefill_plan() == [("smile", {"routing_use_diff": True, "svd_solver": "exact", "gate_k": 32,
                                                 "k": 4}, True)]


@pytest.mark.parametrize("method, sections, message", [
    ({"name": "smile", "gate_k": [4, 0], "k": 4}, {}, "method.gate_k.grid[1]: must be positive"),
    ({"name": "smile", "gate_k": {"grid": []}, "k": 4}, {}, "method.gate_k.grid: empty grid"),
    ({"name": "smile", "gate_k": {"uniform": [1, 4]}, "k": 4}, {"search": {"algorithm": "random"}},
     "method.gate_k.uniform: a uniform distribution does not fit an int parameter"),
    ({"name": "smile", "gate_k": {"randint": [8, 2]}, "k": 4}, {"search": {"algorithm": "random"}},
     "expected low < high"),
    ({"name": "smile", "gate_k": {"choice": [2, 4]}, "k": 4}, {}, "search.algorithm: grid search cannot sample"),
    ({"name": "smile", "gate_k": 2}, {}, "method.k: required by method 'smile'"),
    ({"name": "smile", "gate_k": 2, "k": 4, "top_k": 9}, {}, "method.top_k"),
    ({"name": "task_arithmetic", "scaling": "a lot"}, {}, "method.scaling: expected float"),
    ([], {}, "method: empty list of methods"),
    ({"gate_k": 2}, {}, "method.name: missing"),
    ({"name": "smile", "gate_k": 2, "k": 4}, {"resources": {"gpu": 1.5}}, "resources.gpu: a fraction must be below 1"),
    ({"name": "smile", "gate_k": 2, "k": 4}, {"search": {"mode": "best"}}, "search.mode: must be one of max, min"),
    ({"name": "smile", "gate_k": 2, "k": 4}, {"tracking": {"uri": "x"}}, "tracking.uri: unknown key"),
    ({"name": "smile", "gate_k": 2, "k": 4}, {"colour": 1}, "space.colour: unknown key"),
    ({"name": "smile", "gate_k": 2, "k": 4}, {"search": {"metric": "avg/acc"}}, "search.metric: unknown metric"),
    ({"name": "smile", "gate_k": 2, "k": 4}, {"search": {"metric": "sun397/accuracy"}},
     "search.metric: unknown metric 'sun397/accuracy'"),
    ([{"name": "simple_average"}, {"name": "individual", "model": ["digit", "digits"]}], {},
     "method[1].model: unknown model 'digits'"),
])
def test_errors_name_the_key_path(method, sections, message):
    with pytest.raises(SmileError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        space(method, **sections)


def test_metrics_that_trials_report_are_accepted():
    for metric in ("average/accuracy", "average/loss", "average/score", "digit/accuracy", "roman/loss",
                   "model_info/extra_params"):
        assert space({"name": "smile", "gate_k": 2, "k": 4}, search={"metric": metric}).search["metric"] == metric


def test_the_mode_follows_the_metric_its_task_pool_declares():
    smile = {"name": "smile", "gate_k": 2, "k": 4}
    assert space(smile).search == {**space(smile).search, "metric": "average/accuracy", "mode": "max"}
    assert space(smile, search={"metric": "average/loss"}).search["mode"] == "min"
    assert space(smile, search={"metric": "digit/loss", "mode": "min"}).search["mode"] == "min"
    assert space(smile, search={"metric": "model_info/extra_params", "mode": "min"}).search["mode"] == "min"
    with pytest.raises(SmileError, match="^search.mode: average/loss is better when lower: mode min, not max$"):
        space(smile, search={"metric": "average/loss", "mode": "max"})
    subset = {**POOLS["task_pool"], "tasks": ["digit"]}
    with pytest.raises(SmileError, match="unknown metric 'roman/accuracy'.*tasks: digit"):
        parse_space({**POOLS, "task_pool": subset, "method": {"name": "simple_average"},
                     "search": {"metric": "roman/accuracy"}}, "test")


def test_trial_count_is_what_tune_will_run():
    assert space({"name": "smile", "gate_k": [4, 16], "k": [8, 16, -1]}).trial_count() == 6
    assert space([{"name": "simple_average"}, {"name": "smile", "gate_k": 2, "k": [4, 8]}],
                 search={"num_samples": 2}).trial_count() == 6
    assert space({"name": "smile", "gate_k": {"randint": [1, 33]}, "k": [8, 32]},
                 search={"algorithm": "random", "num_samples": 5}).trial_count() == 10
    assert space({"name": "smile", "gate_k": [4, 8], "k": 4},
                 search={"algorithm": "optuna", "num_samples": 7}).trial_count() == 7


def test_first_difference_names_the_key_path():
    a = {"name": "s", "method": [{"name": "smile", "gate_k": [4, 8]}], "search": {"seed": 0}}
    assert first_difference(a, a) is None
    assert first_difference(a, {**a, "method": [{"name": "smile", "gate_k": [4, 16]}]}) == "method[0].gate_k[1]"
    assert first_difference(a, {**a, "search": {}}) == "search.seed"
    assert first_difference(a, {**a, "tracking": {"experiment": "x"}}) == "tracking"


def test_top_k_above_the_embedded_pool_size_is_refused():
    with pytest.raises(SmileError, match="method.top_k"):
        space({"name": "smile", "gate_k": 2, "k": 4, "top_k": 9})


def test_shipped_spaces_resolve_by_bare_name_and_overrides_apply():
    assert resolve_space_path("clip_b32").name == resolve_space_path("clip_b32.yaml").name == "clip_b32.yaml"
    spec = load_space("clip_b32", ["method.gate_k=[4,16]", "task_pool.max_samples=64"])
    assert len(spec.grid_points()) == 14 and spec.task_pool.max_samples == 64
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=[1, 2]"]) == {"a": {"b": 1, "c": {"d": [1, 2]}}}


def test_a_bare_name_is_the_shipped_space_even_beside_a_same_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for stray in (tmp_path / "embedded.yaml", tmp_path / "search_spaces" / "embedded.yaml"):
        stray.parent.mkdir(exist_ok=True)
        stray.write_text("name: stray\n")
    for name in ("embedded", "embedded.yaml"):
        assert resolve_space_path(name) == SEARCH_SPACES_DIR / "embedded.yaml"
    assert load_space("embedded").methods          # the shipped space, not the stray one-line file


def test_a_path_is_taken_as_given_and_unshipped_names_are_looked_for_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "search_spaces").mkdir()
    for own in ("embedded.yaml", "mine.yaml", "search_spaces/theirs.yaml"):
        (tmp_path / own).write_text("name: own\n")
    assert resolve_space_path("./embedded.yaml").resolve() == tmp_path / "embedded.yaml"
    assert resolve_space_path(tmp_path / "embedded.yaml") == tmp_path / "embedded.yaml"
    assert resolve_space_path("mine").resolve() == resolve_space_path("mine.yaml").resolve() == tmp_path / "mine.yaml"
    assert resolve_space_path("theirs").resolve() == tmp_path / "search_spaces" / "theirs.yaml"


def test_an_unknown_space_is_one_line_naming_space_and_the_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
    assert {"embedded", "clip_b32"} <= set(shipped)
    for space, message in (("nope", "--space nope: no such file, nor a space in search_spaces/ (shipped: "),
                           ("./clip_b32.yaml", "--space ./clip_b32.yaml: no such file (a shipped space is named ")):
        with pytest.raises(SmileError) as error:
            resolve_space_path(space)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
        assert str(error.value).endswith(f"{', '.join(shipped)})")


def test_pyproject_ships_every_package_and_the_search_spaces():
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_namespace_packages(where=str(root), include=["smile_ray*"], exclude=["*__pycache__"])
    assert sorted(config["packages"]) == sorted([*found, "smile_ray.search_spaces"])
    assert config["package-dir"] == {"smile_ray.search_spaces": "search_spaces"}
    assert config["package-data"]["smile_ray.search_spaces"] == ["*.yaml"]
    assert (root / "search_spaces" / "__init__.py").is_file() and list((root / "search_spaces").glob("*.yaml"))


def test_overrides_reach_into_a_list_of_method_blocks():
    spec = load_space("embedded", ["method[3].gate_k=[4]", "method[3].k=[8, 16]"])
    smile = [p for p in spec.grid_points() if p["name"] == "smile"]
    assert [(p["gate_k"], p["k"]) for p in smile] == [(4, 8), (4, 16)]
    for override, message in (("method.gate_k=4", "method is a list of 4; name an entry, e.g. method[3].gate_k"),
                              ("method[4].k=8", "method has no entry [4]"),
                              ("method[x].k=8", "expected KEY.PATH=VALUE"),
                              ("method[-1].k=8", "method[-1]: list indices start at 0"),
                              ("search[0]=1", "search is not a list")):
        with pytest.raises(SmileError, match=re.escape(message)):
            load_space("embedded", [override])
