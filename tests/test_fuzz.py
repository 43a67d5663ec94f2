"""Hostile and random input, property-based (hypothesis): any space YAML text, any `--set` string, any run
configuration → exit status 0 or 2, at most one line on stderr on 2 (never a traceback), and nothing written on 2.

Spaces are checked with `python -m smile_ray.tune --validate` (what every sweep does before Ray starts); `smile_ray.run`
runs what is valid, on the tiny embedded benchmark with a handful of samples. Examples are derandomized (the same
ones on every CI run); HYPOTHESIS_PROFILE=explore draws new ones."""
import contextlib
import io
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smile_ray import run, tune

settings.register_profile("ci", derandomize=True, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPACE = yaml.safe_load((Path(__file__).parent.parent / "search_spaces" / "embedded.yaml").read_text())


def key_paths(value, prefix: str = "") -> list[str]:
    """Every key path of a document, as --set writes them ("method[3].gate_k")."""
    paths = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths += [path, *key_paths(item, path)]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += [f"{prefix}[{i}]", *key_paths(item, f"{prefix}[{i}]")]
    return paths


PATHS = key_paths(SPACE) + ["method.gate_k", "method.k", "method.top_k", "search.scheduler", "resources.gpu",
                            "task_pool.max_samples", "task_pool.tasks", "model_pool.scale", "name"]
scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8) | st.sampled_from(["name", "kind", "gate_k", "k", "top_k", "model"]), inner, max_size=4),
    max_leaves=10)
plausible = st.sampled_from([1, 2, 4, 8, 16, -1, 0, 0.5, "smile", "individual", "simple_average", "grid", "random",
                             "asha", "halving", "max", "min", "digit", None, True, [2, 4], [1, -1]])
values = plausible | plausible | values                           # valid spaces are drawn too, not only refusals
yaml_values = values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
overrides = (st.text(max_size=40)
             | st.builds(lambda path, value: f"{path}={value}", st.sampled_from(PATHS) | st.text(max_size=15),
                         yaml_values | st.text(max_size=20)))


def mutated(space: dict, path: str, value) -> str:
    """The space with one key path set to `value` (through --set's own syntax), as YAML text."""
    from smile_ray.spec import apply_overrides

    return yaml.safe_dump(apply_overrides(space, [f"{path}={yaml.safe_dump(value, default_flow_style=True)}"]))


def mutations(space: dict) -> st.SearchStrategy[str]:
    return st.builds(mutated, st.just(space), st.sampled_from(key_paths(space)), values)


space_texts = st.text(max_size=200) | values.map(yaml.safe_dump) | mutations(SPACE)


def call(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_refused_in_one_line(code: int, err: str) -> None:
    event(f"exit {code}")
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err


@settings(max_examples=1500)
@given(text=space_texts, sets=st.lists(overrides, max_size=2))
def test_any_space_and_overrides_validate_or_are_refused_in_one_line(text, sets):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "space.yaml"
        path.write_text(text)
        code, err = call(tune.main, ["--space", str(path), "--validate", *(f"--set={item}" for item in sets)])
        assert_refused_in_one_line(code, err)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["space.yaml"]


@settings(max_examples=1500)
@given(sets=st.lists(overrides, min_size=1, max_size=3))
def test_any_override_of_a_shipped_space_validates_or_is_refused_in_one_line(sets):
    code, err = call(tune.main, ["--space", "embedded", "--validate", *(f"--set={item}" for item in sets)])
    assert_refused_in_one_line(code, err)


@settings(max_examples=150)
@given(text=space_texts | mutations({**SPACE, "method": {"name": "smile", "gate_k": 2, "k": 4}}),
       sets=st.lists(overrides, max_size=2))
def test_run_runs_or_refuses_any_configuration_in_one_line(tiny_cache, text, sets):
    with tempfile.TemporaryDirectory() as tmp:
        config, report = Path(tmp) / "config.yaml", Path(tmp) / "out" / "report.json"
        config.write_text(text)
        small = [f"--set=model_pool.cache_dir={tiny_cache}", "--set=model_pool.scale=tiny",
                 "--set=task_pool.max_samples=4"]                # what is valid runs on the tiny benchmark, fast
        code, err = call(run.main, ["--config", str(config), *(f"--set={item}" for item in sets), *small,
                                    "--report", str(report), "--no-svd-cache"])
        assert_refused_in_one_line(code, err)
        assert report.exists() == (code == 0)
