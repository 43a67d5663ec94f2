"""Singular projection merging (Space I / II / II+III) against a float64 full-SVD computation."""
import copy

import pytest
import torch
from torch import nn

from smile_ray import SmileError, projection_merge
from smile_ray.smile.projection import energy_rank


def pool():
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(10, 10), nn.LayerNorm(10), nn.Linear(10, 16))
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return base, ft


def expected_weight(w0, w, space, k):
    w0, delta = w0.double(), (w - w0).double()
    u, s, vh = torch.linalg.svd(w0, full_matrices=True)
    v = vh.T
    r = min(w0.shape)
    if k < 0:
        k = int((s.cumsum(0) < 0.5 * s.sum()).sum()) + 1
    if space == "I":
        pu, pv = u[:, :k] @ u[:, :k].T, v[:, :k] @ v[:, :k].T
    elif space == "II":
        pu, pv = u[:, k:r] @ u[:, k:r].T, v[:, k:r] @ v[:, k:r].T
    else:
        pu, pv = u[:, k:] @ u[:, k:].T, v[:, k:] @ v[:, k:].T
    return w0 + pu @ delta @ pv


@pytest.mark.parametrize("space", ["I", "II", "II+III"])
@pytest.mark.parametrize("k", [-1, 3])
def test_projection_matches_full_svd(space, k):
    base, ft = pool()
    merged = projection_merge(base, ft, space=space, k=k)
    for i in (0, 2):
        torch.testing.assert_close(merged[i].weight.double(), expected_weight(base[i].weight, ft[i].weight, space, k),
                                   rtol=1e-4, atol=1e-5)
        assert torch.equal(merged[i].bias, ft[i].bias)
    assert torch.equal(merged[1].weight, ft[1].weight)                # non-linear parts come from the fine-tuned model


def test_space_two_and_two_plus_three_agree_on_square_layers_only():
    base, ft = pool()
    two, two_three = projection_merge(base, ft, space="II"), projection_merge(base, ft, space="II+III")
    torch.testing.assert_close(two[0].weight, two_three[0].weight, rtol=1e-4, atol=1e-5)      # 10 × 10
    assert not torch.allclose(two[2].weight, two_three[2].weight, atol=1e-4)                   # 16 × 10


def test_energy_rank_reaches_half_the_singular_value_mass():
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0])) == 2     # 4 < 5, 7 ≥ 5
    assert energy_rank(torch.tensor([1.0, 1.0])) == 1


def test_bad_space_is_named():
    base, ft = pool()
    with pytest.raises(SmileError, match="method.space"):
        projection_merge(base, ft, space="III")
