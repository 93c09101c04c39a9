"""personakern: persona vectors (extract, monitor, steer) for Hugging Face transformers models.

Layer index convention: ``layer l`` is the output of decoder block ``l``, 0-based
(``model.model.layers[l]``), which is ``output_hidden_states[l + 1]``.
"""
__version__ = "0.1.0"

from .handle import PersonaHandle, patch
from .patching import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .readings import Readings
from .vectors import PersonaVector, VectorFileError, VectorSet, load_vectors
from .models import load_model
from .training import PreventativeSteering, PreventativeSteeringCallback, preventative_steering

__all__ = [
    "patch", "PersonaHandle", "Readings", "PersonaVector", "VectorSet", "VectorFileError",
    "load_vectors", "load_model", "preventative_steering", "PreventativeSteering",
    "PreventativeSteeringCallback", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "__version__",
]
