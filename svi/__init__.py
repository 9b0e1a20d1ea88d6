"""svi: distributed, data-scalable Automatic Differentiation Variational Inference on PyTorch."""

from svi import constraints
from svi.api import fit
from svi.callbacks import Callback
from svi.config import fit_config
from svi.model import Model, ModelError, Param
from svi.options import STAN_ADVI, FitOptions, OptionsError
from svi.posterior import Posterior, load_posterior
from svi import models

__version__ = "0.1.0"

__all__ = ["Callback", "Model", "Param", "ModelError", "constraints", "fit", "fit_config", "FitOptions", "OptionsError", "Posterior",
           "STAN_ADVI", "load_posterior", "__version__"]

