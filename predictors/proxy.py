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

A proxy that trains (``finetune``) also overrides :meth:`AccuracyProxy.evaluate`, which the
search calls instead of ``score``: it reports top-1 at its checkpoints to a :class:`Reporter`
(the search's early stopping, which may raise :class:`StopTrial` from
:meth:`Reporter.report`), and returns a :class:`ProxyResult` that can carry the config with the
activation rates the trained gates realise.  :meth:`AccuracyProxy.options` returns what the
proxy was built with; a resumed search must be built with the same.

A proxy that can score early exits (``ArchConfig.exits``) says so with
:attr:`AccuracyProxy.scores_exits` and returns, for a config with exits, each exit's top-1 in
``ProxyResult.attrs["exit_top1"]`` (``[{"after_stage": s, "top1": %}, ...]``, own head last);
a search with latency budgets (``dynas search --budgets-ms``) refuses the others.
:meth:`AccuracyProxy.chance_top1` is what a budget no exit fits scores.

Register a new proxy with :func:`register_proxy`, or name it without registering as
``package.module:callable`` (``dynas search --proxy mypkg.proxies:make``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

from dynas.errors import ConfigError
from dynas.spaces.config import ArchConfig

__all__ = ["AccuracyProxy", "ProxyResult", "Reporter", "StopTrial", "PROXIES", "PLUGINS", "register_proxy", "get_proxy"]


class StopTrial(Exception):
    """Raised by :meth:`Reporter.report` when the trial is not worth training further."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


class Reporter(abc.ABC):
    """Receives a training proxy's checkpoints (implemented by the search's early stopping)."""

    @abc.abstractmethod
    def report(self, step: int, top1: float, final: bool = False) -> None:
        """Record held-out top-1 (%) after ``step`` training steps; raise :class:`StopTrial` to
        stop.  ``final``: the last checkpoint, recorded only (the trial is complete)."""


@dataclass
class ProxyResult:
    """What :meth:`AccuracyProxy.evaluate` returns."""

    top1: float  # the score, top-1 in percent
    realised: ArchConfig | None = None  # the config at the rates the trained gates realise; None: as configured
    attrs: dict[str, Any] = field(default_factory=dict)  # JSON-ready extras stored as trial user attrs


class AccuracyProxy(abc.ABC):
    #: registry name, e.g. "prior"
    name: str = ""
    #: one line shown in ``--help`` and exports; say what the score is and is not
    description: str = ""
    #: True: :meth:`evaluate` returns ``attrs["exit_top1"]`` for configs with exits (module docstring)
    scores_exits: bool = False

    @abc.abstractmethod
    def score(self, config: ArchConfig) -> float:
        """Predicted top-1 accuracy in percent for ``config``."""

    @abc.abstractmethod
    def static_top1(self, backbone: str) -> float:
        """Top-1 in percent of the static ``backbone``."""

    def static_score(self, config: ArchConfig) -> float:
        """Score of the static network ``config`` (backbone and input size); the default is
        :meth:`static_top1` of its backbone."""
        return float(self.static_top1(config.backbone))

    def reference_top1(self, config: ArchConfig) -> float:
        """The top-1 (%) the study's hypervolume is measured from for static network ``config``:
        by default its score minus 5 points (an ImageNet-scale drop)."""
        return self.static_score(config) - 5.0

    def chance_top1(self, config: ArchConfig) -> float:
        """Top-1 (%) of guessing, on the task the proxy scores ``config`` on: by default
        100 / the backbone's classes (ImageNet: 0.1)."""
        return 100.0 / config.spec.num_classes

    def evaluate(self, config: ArchConfig, reporter: Reporter | None = None) -> ProxyResult:
        """Score ``config``, reporting checkpoints to ``reporter``; the default calls :meth:`score` once."""
        return ProxyResult(float(self.score(config)))

    def options(self) -> dict[str, Any] | None:
        """JSON-ready options the proxy was built with (stored in the study; None: no options)."""
        return None


PROXIES: dict[str, Callable[[], AccuracyProxy]] = {}

#: built-in proxies by import path, imported only when first asked for, so that this module
#: imports none of them (they import it to subclass :class:`AccuracyProxy`).  ``finetune``
#: trains, so it is a plugin of :mod:`dynas.kernels` (which runs configs for real and feeds
#: what it measures back here); nothing in ``predictors`` imports ``kernels``.
PLUGINS: dict[str, str] = {
    "prior": "dynas.predictors.accuracy:PriorProxy",
    "finetune": "dynas.kernels.finetune:FinetuneProxy",
}


def register_proxy(name: str) -> Callable[[type[AccuracyProxy]], type[AccuracyProxy]]:
    def deco(cls: type[AccuracyProxy]) -> type[AccuracyProxy]:
        cls.name = name
        PROXIES[name] = cls
        return cls

    return deco


def get_proxy(name: str, **options: Any) -> AccuracyProxy:
    """The proxy registered as ``name``, or built by ``package.module:callable`` (a callable
    returning an :class:`AccuracyProxy`: a proxy of your own, without registering it,
    importable by every worker process).  ``options`` are passed to the factory as keywords."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"proxy={name!r} is not a proxy name; allowed: {', '.join(sorted({*PROXIES, *PLUGINS}))} or package.module:callable"
        )
    if ":" in name:
        return _entry_point(name, options)
    if name in PLUGINS and name not in PROXIES:
        proxy = _entry_point(PLUGINS[name], options, name)
        proxy.name = name
        return proxy
    if name not in PROXIES:
        raise ConfigError(
            f"proxy={name!r} is unknown; allowed: {', '.join(sorted({*PROXIES, *PLUGINS}))} or package.module:callable"
        )
    return _build(name, PROXIES[name], options)


def _build(name: str, factory: Any, options: dict[str, Any]) -> Any:
    if not options:
        return factory()
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for key in options:
            if key not in params:
                allowed = ", ".join(k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
                raise ConfigError(
                    f"proxy option {key}={options[key]!r} is not an option of proxy {name!r}; "
                    f"allowed: {allowed or 'none'}"
                )
    return factory(**options)


def _entry_point(spec: str, options: dict[str, Any], label: str | None = None) -> AccuracyProxy:
    import importlib

    module, _, attr = spec.partition(":")
    try:
        factory = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError, ValueError) as exc:
        first = str(exc).split("\n")[0]
        raise ConfigError(
            f"proxy={spec!r} cannot be loaded ({first}); allowed: package.module:callable on sys.path"
        ) from None
    proxy = _build(label or spec, factory, options) if callable(factory) else factory
    if not isinstance(proxy, AccuracyProxy):
        raise ConfigError(
            f"proxy={spec!r} gave a {type(proxy).__name__}; allowed: a callable returning a dynas AccuracyProxy"
        )
    return proxy
