"""Model creation (the only ``timm.create_model`` call), the registry of quantizable module types and
the float -> quantized swap."""

from fimaq.models.factory import create_fp_model, load_state_dict_file
from fimaq.models.registry import Quantizable, Registration, SwapContext, register
from fimaq.models.swap import QLayer, iter_qlayers, quantize_model

__all__ = [
    "QLayer",
    "Quantizable",
    "Registration",
    "SwapContext",
    "create_fp_model",
    "iter_qlayers",
    "load_state_dict_file",
    "quantize_model",
    "register",
]
