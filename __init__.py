"""dynas: latency-aware search of dynamic CNN configurations.

Python API (the CLI calls the same functions)::

    import dynas
    pred = dynas.predict({"backbone": "resnet50", "stages": [...]}, "v100")
    pred.latency_ms, pred.speedup, pred.to_dict()
"""

from dynas.errors import ConfigError, DynasError, StudyError, TargetError
from dynas.predictors.latency import predict
from dynas.predictors.targets import HardwareTarget, list_targets, load_target
from dynas.spaces.config import ArchConfig, StageConfig, load_config

__version__ = "0.1.0"

__all__ = [
    "predict",
    "build_model",
    "load_config",
    "load_target",
    "list_targets",
    "ArchConfig",
    "StageConfig",
    "HardwareTarget",
    "DynasError",
    "ConfigError",
    "TargetError",
    "StudyError",
    "__version__",
]


def __getattr__(name: str):
    # build_model needs torch; import it on first use so `import dynas` stays light.
    if name == "build_model":
        from dynas.kernels.model import build_model

        return build_model
    raise AttributeError(f"module 'dynas' has no attribute {name!r}")
