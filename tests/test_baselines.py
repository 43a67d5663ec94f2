"""Weight averaging, task arithmetic and single models, against direct computations."""
import pytest
import torch

from smile_ray import SmileError, individual, simple_average, task_arithmetic
from tests.test_upscale import make_net_pool


def test_simple_average_is_the_mean_of_the_experts():
    base, experts = make_net_pool(3)
    merged = simple_average(base, experts)
    for name, param in merged.named_parameters():
        mean = torch.stack([dict(e.named_parameters())[name] for e in experts]).mean(0)
        torch.testing.assert_close(param, mean)


@pytest.mark.parametrize("scaling", [0.0, 0.3, 1.0])
def test_task_arithmetic_adds_scaled_task_vectors(scaling):
    base, experts = make_net_pool(3)
    before = [p.clone() for p in base.parameters()]
    merged = task_arithmetic(base, experts, scaling=scaling)
    for name, param in merged.named_parameters():
        theta0 = dict(base.named_parameters())[name]
        expected = theta0 + scaling * sum(dict(e.named_parameters())[name] - theta0 for e in experts)
        torch.testing.assert_close(param, expected)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), before))


def test_individual_returns_a_copy_of_the_named_model():
    base, experts = make_net_pool(2)
    pool = {"a": experts[0], "b": experts[1]}
    chosen = individual(base, pool, model="b")
    assert chosen is not experts[1]
    assert all(torch.equal(p, q) for p, q in zip(chosen.parameters(), experts[1].parameters()))
    assert all(torch.equal(p, q) for p, q in zip(individual(base, pool, model="pretrained").parameters(),
                                                 base.parameters()))
    with pytest.raises(SmileError, match="method.model: unknown model 'c'"):
        individual(base, pool, model="c")
