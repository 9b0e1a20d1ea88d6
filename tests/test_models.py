"""Every built-in model recovers known parameters from synthetic data (svi.synthetic)."""

import numpy as np
import pytest
import torch

import svi
from svi.synthetic import SyntheticSpec, as_batch, build_model, make_rows, make_truth
from svi.transforms import element_names

CASES = {
    "linear": (SyntheticSpec("linear", n_features=3), 3000),
    "logistic": (SyntheticSpec("logistic", n_features=3), 3000),
    "poisson": (SyntheticSpec("poisson", n_features=3), 3000),
    "student_t": (SyntheticSpec("student_t", n_features=3), 3000),
    "mixture": (SyntheticSpec("mixture", n_components=3), 3000),
    # groups with much data each (centred by svi) and many groups with little data each (non-centred)
    "hierarchical_linear_rich": (SyntheticSpec("hierarchical_linear", n_features=3, n_groups=8), 3000),
    "hierarchical_linear": (SyntheticSpec("hierarchical_linear", n_features=3, n_groups=100), 1000),
    "hierarchical_logistic_slopes": (
        SyntheticSpec("hierarchical_logistic", n_features=2, n_groups=20, varying_slopes=True), 3000),
}


@pytest.mark.parametrize("case", list(CASES))
def test_builtin_model_recovers_the_truth(case):
    spec, n = CASES[case]
    truth = make_truth(spec, seed=0)
    rows = make_rows(spec, truth, n, np.random.default_rng(1), dtype=np.float64)
    family = "fullrank" if case != "hierarchical_logistic_slopes" else "meanfield"
    post = svi.fit(build_model(spec), as_batch(spec, rows), family=family, seed=0)
    assert post.info.converged, post.info.reason
    s = post.summary(n=4000, seed=1)
    z = {}
    for name, value in truth.items():
        value = np.asarray(value)
        for element, v in zip(element_names(name, value.shape), value.reshape(-1)):
            z[element] = (s.loc[element, "mean"] - v) / s.loc[element, "sd"]
    worst = max(z, key=lambda k: abs(z[k]))
    # max over up to ~100 elements of |N(0,1)|: 4.5 fails with probability ~1e-3
    assert abs(z[worst]) < 4.5, f"{worst}: posterior mean {z[worst]:.2f} sd from the truth"


def test_models_are_vectorised_over_particles():
    """Each model's log-likelihood for S particles equals S single-particle calls."""
    for spec, _ in CASES.values():
        model = build_model(spec)
        space = svi.transforms.ParamSpace(model.params)
        rows = make_rows(spec, make_truth(spec, 0), 7, np.random.default_rng(0), dtype=np.float64)
        batch = {k: torch.as_tensor(v) for k, v in as_batch(spec, rows).items()}
        z = torch.randn(4, space.size, dtype=torch.float64)
        theta, _ = space.constrain(z)
        together = model.log_likelihood(theta, batch)
        prior = model.log_prior(theta)
        for s in range(4):
            one, _ = space.constrain(z[s : s + 1])
            assert torch.allclose(model.log_likelihood(one, batch)[0], together[s], atol=1e-10)
            assert torch.allclose(model.log_prior(one)[0], prior[s], atol=1e-10)
