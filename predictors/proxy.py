"""Accuracy proxies: what a candidate may score.

Lifecycle of a proxy (one small ABC for the whole family, as Optuna does for samplers):

1. It is looked up by name in :data:`PROXIES` (``dynas search --proxy NAME``) and constructed
   once per search with no arguments (or with keyword options from the Python API).
2. :meth:`AccuracyProxy.score` is called once per trial with a validated
   :class:`~dynas.spaces.config.ArchConfig` and returns predicted ImageNet top-1 in percent.
   It may be slow (a later proxy fine-tunes) but must be deterministic for a given config
   unless documented otherwise.
3. :meth:`AccuracyProxy.static_top1` gives the score of the static backbone, used as the
   baseline in tables and plots.

Register a new proxy with :func:`register_proxy`, or name it without registering as
``package.module:callable`` (``dynas search --proxy mypkg.proxies:make``).
"""

from __future__ import annotations

import abc
from typing import Callable

from dynas.errors import ConfigError
from dynas.spaces.config import ArchConfig

__all__ = ["AccuracyProxy", "PROXIES", "register_proxy", "get_proxy"]


class AccuracyProxy(abc.ABC):
    #: registry name, e.g. "prior"
    name: str = ""
    #: one line shown in ``--help`` and exports; say what the score is and is not
    description: str = ""

    @abc.abstractmethod
    def score(self, config: ArchConfig) -> float:
        """Predicted top-1 accuracy in percent for ``config``."""

    @abc.abstractmethod
    def static_top1(self, backbone: str) -> float:
        """Top-1 in percent of the static ``backbone``."""


PROXIES: dict[str, Callable[[], AccuracyProxy]] = {}


def register_proxy(name: str) -> Callable[[type[AccuracyProxy]], type[AccuracyProxy]]:
    def deco(cls: type[AccuracyProxy]) -> type[AccuracyProxy]:
        cls.name = name
        PROXIES[name] = cls
        return cls

    return deco


def get_proxy(name: str) -> AccuracyProxy:
    """The proxy registered as ``name``, or built by ``package.module:callable`` (a callable
    with no arguments returning an :class:`AccuracyProxy`: a proxy of your own, without
    registering it, importable by every worker process)."""
    # Import the built-in proxies so they register themselves.
    from dynas.predictors import accuracy  # noqa: F401

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"proxy={name!r} is not a proxy name; allowed: {', '.join(sorted(PROXIES))} or package.module:callable")
    if ":" in name:
        return _entry_point(name)
    if name not in PROXIES:
        raise ConfigError(
            f"proxy={name!r} is unknown; allowed: {', '.join(sorted(PROXIES))} or package.module:callable"
        )
    return PROXIES[name]()


def _entry_point(spec: str) -> AccuracyProxy:
    import importlib

    module, _, attr = spec.partition(":")
    try:
        factory = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError, ValueError) as exc:
        first = str(exc).split("\n")[0]
        raise ConfigError(f"proxy={spec!r} cannot be loaded ({first}); allowed: package.module:callable on sys.path") from None
    proxy = factory() if callable(factory) else factory
    if not isinstance(proxy, AccuracyProxy):
        raise ConfigError(
            f"proxy={spec!r} gave a {type(proxy).__name__}; allowed: a callable returning a dynas AccuracyProxy"
        )
    return proxy
