"""Importing a model class named in a file, only from modules the user trusts.

Posterior files, job files downloaded from a tracking server and checkpoints are data
(DESIGN.md, "Trust boundaries"): a class path written inside one of them is imported only
when its module is svi's own built-in models or a module the user named explicitly (an
option, a ``--trust`` flag, or ``SVI_TRUSTED_MODULES`` for the MLflow pyfunc loader), and
only when it names an :class:`svi.Model` subclass.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Iterable

from svi.model import Model

__all__ = ["BUILTIN_MODULES", "UntrustedModelError", "trusted_modules", "is_trusted", "import_model_class"]

#: modules whose model classes any file may name: svi's own built-in models
BUILTIN_MODULES = ("svi.models",)
_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UntrustedModelError(ValueError):
    """A file names model code that svi will not import without the user's say-so."""


def trusted_modules(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The built-in modules, ``extra``, and the comma-separated ``SVI_TRUSTED_MODULES``."""
    env = [m.strip() for m in os.environ.get("SVI_TRUSTED_MODULES", "").split(",") if m.strip()]
    return BUILTIN_MODULES + tuple(extra) + tuple(env)


def is_trusted(module_name: str, trusted: Iterable[str] = ()) -> bool:
    """Whether ``module_name`` is one of ``trusted_modules(trusted)`` or inside one of them."""
    return any(module_name == t or module_name.startswith(t + ".") for t in trusted_modules(trusted))


def import_model_class(target: str, trusted: Iterable[str] = (), named_in: str = "the file") -> type[Model]:
    """Import ``"package.module:ClassName"`` when its module is trusted and it is an ``svi.Model`` class.

    Args:
        target: the class path as written in the file.
        trusted: modules the caller trusts besides ``svi.models`` (and ``SVI_TRUSTED_MODULES``).
        named_in: where the path was read, for the message.

    Raises:
        UntrustedModelError: a malformed path, an untrusted module, or something that is not a model class.
    """
    module_name, _, qualname = str(target).partition(":")
    parts = qualname.split(".") if qualname else []
    if not parts or not all(_PART.match(p) for p in module_name.split(".") + parts):
        raise UntrustedModelError(f"{named_in} names the model class {target!r}, which is not 'package.module:Class'")
    if not is_trusted(module_name, trusted):
        raise UntrustedModelError(
            f"{named_in} names the model class {target!r}; svi imports model code named in a file only from "
            f"svi.models and modules you trust. If you trust it, pass trust=[{module_name!r}] (CLI: --trust "
            f"{module_name}, MLflow pyfunc: SVI_TRUSTED_MODULES={module_name}), or pass the model object yourself")
    obj = importlib.import_module(module_name)
    for part in parts:
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, Model)):
        raise UntrustedModelError(f"{named_in} names {target!r}, which is not an svi.Model class")
    return obj
