"""Model creation (the only ``timm.create_model`` call) and the float -> quantized swap."""

from fimaq.models.factory import create_fp_model, load_state_dict_file

__all__ = ["create_fp_model", "load_state_dict_file"]
