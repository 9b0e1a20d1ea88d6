"""Group effects: the partially centred bijection and the centring chosen from the data (svi.centering)."""

import math

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

import svi
from svi import constraints
from svi.centering import choose_centering, data_information, empirical_bayes_scale
from svi.model import ModelError, Param
from svi.transforms import ParamSpace


def _space():
    return ParamSpace({
        "w": Param((3,)), "mu": Param(()), "tau": Param((), constraints.positive),
        "alpha": Param((5,), loc="mu", scale="tau"),
        "tau_w": Param((3,), constraints.positive), "beta": Param((5, 3), loc="w", scale="tau_w"),
    })


@pytest.mark.parametrize("lam", [0.0, 1.0, "random"])
def test_log_det_is_the_jacobian_of_the_whole_map(lam):
    """log|det J| of z -> theta (all parameters at once: group effects depend on loc and scale)
    against autograd, and the inverse round trip, at centred, non-centred and mixed centrings."""
    space = _space()
    gen = torch.Generator().manual_seed(0)
    for name in ("alpha", "beta"):
        shape = space.centering[name].shape
        space.set_centering(name, torch.rand(shape, generator=gen, dtype=torch.float64) if lam == "random"
                            else torch.full(shape, float(lam)))
    z = torch.randn(3, space.size, generator=gen, dtype=torch.float64)
    theta, log_det = space.constrain(z)

    def flat(z1):
        t, _ = space.constrain(z1.unsqueeze(0))
        return torch.cat([t[n].reshape(-1) for n in space.names])

    for s in range(3):
        expected = torch.linalg.slogdet(jacobian(flat, z[s]))[1]
        assert torch.allclose(log_det[s], expected, atol=1e-10)
    assert torch.allclose(space.unconstrain(theta), z, atol=1e-12)
    if lam == 1.0:  # centred: the coordinates are the group effects themselves
        assert torch.allclose(theta["alpha"], space.unflatten(z)["alpha"], atol=1e-14)
    if lam == 0.0:  # non-centred: alpha = mu + tau * u
        u = space.unflatten(z)["alpha"]
        assert torch.allclose(theta["alpha"], theta["mu"][:, None] + theta["tau"][:, None] * u, atol=1e-12)


def test_centring_survives_the_spec_round_trip():
    space = _space()
    space.set_centering("alpha", torch.linspace(0, 1, 5, dtype=torch.float64))
    again = ParamSpace.from_spec(space.spec())
    assert torch.equal(again.centering["alpha"], space.centering["alpha"])
    z = torch.randn(2, space.size, dtype=torch.float64)
    assert torch.equal(again.constrain(z)[0]["beta"], space.constrain(z)[0]["beta"])


def test_bad_group_effect_declarations_are_refused():
    with pytest.raises(ModelError, match="needs both loc and scale"):
        Param((4,), loc="mu")
    with pytest.raises(ModelError, match="real-valued"):
        Param((4,), constraints.positive, loc="mu", scale="tau")
    with pytest.raises(ModelError, match="centering"):
        Param((4,), loc="mu", scale="tau", centering=1.5)
    with pytest.raises(ModelError, match="'sigma', which is not one of"):
        ParamSpace({"mu": Param(()), "a": Param((4,), loc="mu", scale="sigma")}, "M")
    with pytest.raises(ModelError, match="must be a positive parameter"):
        ParamSpace({"mu": Param(()), "s": Param(()), "a": Param((4,), loc="mu", scale="s")}, "M")
    with pytest.raises(ModelError, match="broadcasts from the right"):
        ParamSpace({"mu": Param((3,)), "s": Param((), constraints.positive), "a": Param((4, 2), loc="mu", scale="s")})


def _grouped_linear(sizes, tau=0.7, sigma=0.8, seed=0):
    rng = np.random.default_rng(seed)
    G = len(sizes)
    alpha = 0.3 + tau * rng.normal(size=G)
    g = np.repeat(np.arange(G), sizes)
    x = rng.normal(size=(len(g), 2))
    y = x @ np.array([0.5, -0.2]) + alpha[g] + sigma * rng.normal(size=len(g))
    return {"x": torch.tensor(x), "y": torch.tensor(y), "g": torch.tensor(g)}, alpha


def test_information_is_the_exact_per_group_curvature():
    """For a Gaussian likelihood, minus the second derivative in a group intercept is n_g / sigma^2."""
    sizes = [3, 40, 400]
    batch, _ = _grouped_linear(sizes)
    model = svi.models.HierarchicalLinearRegression(2, 3)
    space = ParamSpace(model.params)
    z = torch.randn(space.size, dtype=torch.float64)
    sigma = float(space.constrain(z.unsqueeze(0))[0]["sigma"])
    _, info = data_information(model, space, batch, num_rows=len(batch["y"]), z=z, name="alpha")
    assert torch.allclose(info, torch.tensor(sizes, dtype=torch.float64) / sigma**2, rtol=1e-10)
    # scaled by N/n when the rows are a sample
    _, scaled = data_information(model, space, batch, num_rows=4 * len(batch["y"]), z=z, name="alpha")
    assert torch.allclose(scaled, 4 * info, rtol=1e-10)


def test_empirical_bayes_scale_recovers_a_known_spread():
    """Estimates with known noise around a known loc and scale: the marginal-likelihood fixed point."""
    gen = np.random.default_rng(3)
    G, loc, scale = 4000, 1.5, 0.6
    info = gen.uniform(0.5, 50.0, size=G)
    est = loc + scale * gen.normal(size=G) + gen.normal(size=G) / np.sqrt(info)
    m, s = empirical_bayes_scale(torch.tensor(est), torch.tensor(info), None)
    assert abs(float(m) - loc) < 0.05 and abs(float(s) - scale) < 0.05
    _, s_known = empirical_bayes_scale(torch.tensor(est), torch.tensor(info), torch.tensor(loc))
    assert abs(float(s_known) - scale) < 0.05


def test_centring_follows_each_groups_data():
    """Groups of 2 rows lean non-centred, groups of 2,000 centred, from any starting point: the
    weight is I s^2 / (1 + I s^2) with the scale the groups' data imply, not the point's."""
    sizes = [2] * 30 + [2000] * 30
    batch, _ = _grouped_linear(sizes, tau=0.7, sigma=0.8)
    model = svi.models.HierarchicalLinearRegression(2, len(sizes))
    space = ParamSpace(model.params)
    for tau_at_point in (0.05, 0.7, 20.0):
        theta = {"w": torch.tensor([[0.5, -0.2]]), "mu": torch.tensor([0.3]), "tau": torch.tensor([tau_at_point]),
                 "alpha": torch.zeros(1, len(sizes)), "sigma": torch.tensor([0.8])}
        theta = {k: v.double() for k, v in theta.items()}
        lam, scales = choose_centering(model, space, batch, len(batch["y"]), space.unconstrain(theta)[0])
        assert 0.4 < float(scales["tau"]) < 1.2, scales  # the data's spread, wherever tau was
        info = torch.tensor(sizes, dtype=torch.float64) / 0.8**2
        expected = info * scales["tau"] ** 2 / (1 + info * scales["tau"] ** 2)
        assert torch.allclose(lam["alpha"], expected, rtol=1e-9)
        assert float(lam["alpha"][:30].max()) < 0.7 and float(lam["alpha"][30:].min()) > 0.99
    assert space.centering["alpha"].abs().max() == 0  # choose_centering leaves the space as it was


def _hier_fit(data, folder, max_steps, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "reached max_steps" is expected here
        return svi.fit(svi.models.HierarchicalLinearRegression(2, 12), data, batch_size=256, max_steps=max_steps,
                       tol_param=1e-6, checkpoint_dir=str(folder), checkpoint_every=100, tracking=False,
                       progress=False, **kw)


def test_centring_is_saved_with_checkpoints_and_posteriors(tmp_path):
    """The chosen centring defines the family's coordinates: a resume restores it (resume equals no
    resume, step for step) and a saved posterior draws the same values, with or without the model."""
    batch, _ = _grouped_linear([3] * 6 + [600] * 6)
    data = {k: v.numpy() for k, v in batch.items()}
    straight = _hier_fit(data, tmp_path / "a", 450)
    lam = straight.space.centering["alpha"]
    assert float(lam[:6].max()) < 0.9 and float(lam[6:].min()) > 0.98  # chosen per group, not all alike
    _hier_fit(data, tmp_path / "b", 250)
    resumed = _hier_fit(data, tmp_path / "b", 450, resume=True, force_resume=True)
    assert torch.equal(resumed.space.centering["alpha"], lam)
    for p, q in zip(straight.family.parameters(), resumed.family.parameters()):
        assert torch.equal(p, q)
    straight.save(tmp_path / "post")
    for loaded in (svi.load_posterior(str(tmp_path / "post")),
                   svi.Posterior.load(tmp_path / "post", model=svi.models.HierarchicalLinearRegression(2, 12))):
        assert torch.equal(loaded.space.centering["alpha"], lam)
        assert torch.equal(loaded.sample(50, seed=3)["alpha"], straight.sample(50, seed=3)["alpha"])


def test_the_cli_report_folds_many_group_rows_but_never_the_hyper_parameters():
    import pandas as pd

    from svi.cli import _fold_group_effects

    model = svi.models.HierarchicalLinearRegression(2, 300)
    space = ParamSpace(model.params)
    names = space.constrained_names()
    z = pd.Series(0.5, index=names)
    z["alpha[17]"] = 3.5
    table = pd.DataFrame({"mean": 0.0, "sd": 1.0, "z": z})
    shown, lines = _fold_group_effects(table, space)
    assert list(shown.index) == ["w[0]", "w[1]", "mu", "tau", *[f"alpha[{i}]" for i in range(5)], "sigma"]
    assert lines == ["alpha: 295 more rows in the saved summary.csv; |z| against the truth: max 3.50 (alpha[17]), "
                     "0.3% beyond 3, 99.7% within 2"]
    small = table.iloc[:20]
    assert _fold_group_effects(small, space)[0] is small  # a short table is printed whole


def test_a_recorded_centring_outside_zero_one_is_refused():
    """posterior.json is data: a crafted centring (5, NaN, text) is an error, never another transform."""
    spec = _space().spec()
    for bad in (5.0, float("nan"), "x"):
        spec["alpha"]["group"]["centering"] = [bad] * 5
        with pytest.raises(ModelError, match="recorded centring is not numbers in"):
            ParamSpace.from_spec(spec)
