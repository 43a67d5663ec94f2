"""Routing analysis: which expert each SMILE layer sends a task's tokens to, and how many reach the task's own."""
import torch

from smile_ray import upscale
from smile_ray.plots import plot_routing
from smile_ray.report import flatten_metrics
from smile_ray.smile.routing import RoutingRecorder, own_expert_share
from smile_ray.trial import build_pools, run_trial
from tests.test_layer import make_pool


def test_the_recorder_counts_first_choices_per_layer_and_resets():
    base, experts = make_pool(3)
    model = upscale(base, experts, gate_k=2, k=3, top_k=2)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    with RoutingRecorder(model) as recorder:
        model(x)
        first = recorder.take()
        assert recorder.take() == {name: [0.0, 0.0, 0.0] for name in first}          # reset by take()
    assert set(first) == {"0", "2"} and all(abs(sum(shares) - 1) < 1e-9 for shares in first.values())
    chosen = model[0].route(x)[1][:, 0]
    assert first["0"] == (torch.bincount(chosen, minlength=3).double() / 40).tolist()
    assert all(layer.routing_counts is None for layer in recorder.layers.values())   # off outside the block


def test_own_expert_share_is_the_mean_over_layers_of_the_tasks_own_expert():
    routing = {"a": {"l0": [0.5, 0.5], "l1": [1.0, 0.0]}, "b": {"l0": [0.2, 0.8], "l1": [0.4, 0.6]},
               "pretrained": {"l0": [1.0, 0.0]}}
    assert own_expert_share(routing, ["a", "b"]) == {"a": 0.75, "b": 0.7}


def test_a_smile_report_says_where_each_tasks_tokens_went(tiny_config):
    pools = build_pools(tiny_config)
    report = run_trial(tiny_config, pools=pools)
    routing = report["routing"]
    assert routing["experts"] == pools.models.expert_names and list(routing["tasks"]) == pools.tasks.task_names
    assert 0 <= routing["own_expert_share"] <= 1
    assert flatten_metrics(report)["routing/own_expert_share"] == routing["own_expert_share"]
    assert "routing" not in run_trial({**tiny_config, "method": {"name": "simple_average"}}, pools=pools)
    figure = plot_routing(routing)
    figure.canvas.draw()
    assert figure.canvas.get_width_height()[0] >= 1000 and len(figure.axes) == 3          # two panels, a colorbar
