"""Bijections: inverse round trips and log|det J| against autograd Jacobians."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from svi import constraints
from svi.model import ModelError, Param
from svi.transforms import ParamSpace, biject_to, element_names



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _free(y: torch.Tensor, kind: str) -> torch.Tensor:
    """The free coordinates of a constrained value (what the Jacobian is taken with respect to)."""
    if kind == "simplex":
        return y[:-1]
    if kind == "strict_lower":
        d = y.shape[-1]
        r, c = torch.tril_indices(d, d, -1)
        return y[r, c]
    if kind == "lower":
        d = y.shape[-1]
        r, c = torch.tril_indices(d, d)
        return y[r, c]
    return y.reshape(-1)


CASES = [
    ("real", constraints.real_vector, (3,), "all"),
    ("positive", constraints.positive, (3,), "all"),
    ("greater_than", constraints.greater_than(2.0), (3,), "all"),
    ("less_than", constraints.less_than(-1.0), (3,), "all"),
    ("interval", constraints.interval(-2.0, 3.0), (3,), "all"),
    ("unit_interval", constraints.unit_interval, (3,), "all"),
    ("simplex", constraints.simplex, (4,), "simplex"),
    ("ordered_vector", constraints.ordered_vector, (4,), "all"),
    ("corr_cholesky", constraints.corr_cholesky, (3, 3), "strict_lower"),
    ("lower_cholesky", constraints.lower_cholesky, (3, 3), "lower"),
    ("positive_definite", constraints.positive_definite, (3, 3), "lower"),
]


@pytest.mark.parametrize("name,constraint,shape,free", CASES, ids=[c[0] for c in CASES])
def test_round_trip_and_log_det(name, constraint, shape, free):
    t = biject_to(constraint)
    ushape = t.inverse_shape(shape)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(ushape, generator=g)
        y = t(x)
        assert bool(constraint.check(y).all()), f"{name}: forward leaves the support"
        assert torch.allclose(t.inv(y), x, atol=1e-9), f"{name}: inverse round trip"
        jac = jacobian(lambda u: _free(t(u), free), x).reshape(-1, x.numel())
        assert jac.shape[0] == jac.shape[1], f"{name}: Jacobian not square: {tuple(jac.shape)}"
        expected = torch.linalg.slogdet(jac).logabsdet
        got = t.log_abs_det_jacobian(x, y).sum()
        assert abs(float(got - expected)) < 1e-6, f"{name}: log|det J| {float(got)} vs autograd {float(expected)}"


def test_param_space_flatten_constrain_vectorised():
    params = {
        "a": Param(()), "s": Param((2,), constraints.positive), "p": Param((3,), constraints.simplex),
        "L": Param((3, 3), constraints.corr_cholesky), "m": Param((3,), constraints.ordered_vector),
        "S": Param((2, 2), constraints.positive_definite),
    }
    space = ParamSpace(params)
    assert space.size == 1 + 2 + 2 + 3 + 3 + 3
    z = torch.randn(5, space.size)
    theta, log_det = space.constrain(z)
    assert {k: tuple(v.shape) for k, v in theta.items()} == {
        "a": (5,), "s": (5, 2), "p": (5, 3), "L": (5, 3, 3), "m": (5, 3), "S": (5, 2, 2)}
    assert torch.allclose(space.unconstrain(theta), z, atol=1e-9)
    assert torch.equal(space.flatten(space.unflatten(z)), z)
    # the vectorised log-det is the sum of each block's, particle by particle
    for s in range(5):
        total = 0.0
        for b in space.blocks:
            if b.identity:
                continue
            u = z[s, b.offset: b.offset + b.size].reshape(b.unconstrained_shape)
            total += float(b.transform.log_abs_det_jacobian(u, b.transform(u)).sum())
        assert math.isclose(float(log_det[s]), total, rel_tol=1e-10, abs_tol=1e-10)


def test_constraint_without_bijection_is_a_clear_error():
    with pytest.raises(ModelError, match=r"parameter 'flag'.*Boolean.*no bijection"):
        ParamSpace({"w": Param((2,)), "flag": Param((), constraints.boolean)}, model_name="Broken")


def test_init_maps_to_unconstrained_and_bad_init_is_an_error():
    space = ParamSpace({"sigma": Param((), constraints.positive, init=2.0), "w": Param((2,), init=[1.0, -1.0])})
    z = space.initial_point()
    assert torch.allclose(z, torch.tensor([math.log(2.0), 1.0, -1.0]))
    with pytest.raises(ModelError, match="sigma.*violates"):
        ParamSpace({"sigma": Param((), constraints.positive, init=-1.0)}).initial_point()


def test_element_names_are_zero_based():
    assert element_names("w", (3,)) == ["w[0]", "w[1]", "w[2]"]
    assert element_names("L", (2, 2)) == ["L[0,0]", "L[0,1]", "L[1,0]", "L[1,1]"]
    assert element_names("b", ()) == ["b"]


def test_group_layout_joins_effects_of_the_same_groups_into_one_block():
    params = {"w": Param((2,)), "alpha": Param((3,), loc=0.0, scale="tau"), "tau": Param((), constraints.positive),
              "beta": Param((3, 2), loc="w", scale=1.0), "other": Param((4,), loc=0.0, scale=1.0)}
    space = ParamSpace(params)
    layout = space.group_layout()
    # z: w 0-1, alpha 2-4, tau 5, beta 6-11 (row-major: group g at 6 + 2g), other 12-15
    assert layout.global_index.tolist() == [0, 1, 5]
    by_size = {tuple(g.shape): g.tolist() for g in layout.groups}
    assert by_size[(3, 3)] == [[2, 6, 7], [3, 8, 9], [4, 10, 11]]  # each group's intercept and slopes together
    assert by_size[(4, 1)] == [[12], [13], [14], [15]]
    assert ParamSpace({"w": Param((2,))}).group_layout().groups == ()


def test_importing_svi_leaves_torchs_registry_as_it_was():
    """Other libraries in the process keep torch's bijections; svi's registry answers for svi."""
    import subprocess
    import sys

    code = ("import torch.distributions as d; before = {k: v for k, v in d.biject_to._registry.items()}; "
            "import svi, svi.transforms as t; after = d.biject_to._registry; "
            "assert before == after, set(after) ^ set(before); "
            "assert type(d.biject_to(d.constraints.positive)).__name__ == 'ComposeTransform'; "
            "assert type(t.biject_to(d.constraints.positive)).__name__ == 'ExpTransform'; "
            "assert type(t.biject_to(d.constraints.interval(0, 2))) is type(d.biject_to(d.constraints.interval(0, 2))); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    with pytest.raises(NotImplementedError):
        import torch.distributions as d

        d.biject_to(constraints.ordered_vector)  # svi's own constraints are svi's registry's alone
