"""lazymar: a workbench for token and condition redundancy in Masked Autoregressive image generators."""
from .checkpoint import CheckpointError, load_model
from .config import CONFIGS, MARConfig, get_config
from .model import MAR
from .sampling import SamplingSettings, StepContext, StepObserver, StepRunner, current_step, generate, observe_steps
from .version import __version__

__all__ = [
    "CONFIGS", "CheckpointError", "MAR", "MARConfig", "SamplingSettings", "StepContext", "StepObserver", "StepRunner",
    "current_step", "generate", "get_config", "load_model", "observe_steps", "__version__",
]
