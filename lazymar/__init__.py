from .config import MARConfig, get_config
from .model import MAR
__version__ = "0.1.0"
