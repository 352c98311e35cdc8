"""PyTorch <-> lensjax weight conversion (the only package that imports torch).

    from bridge import import_model, export_files
    model = import_model(perceiver=..., gpt2_blocks=..., cross_attention=..., gpt2=...)
    model.save("weights/v3b")
    export_files("weights/v3b", "exported/")
"""

from bridge.convert import export_files, import_model, import_params
from bridge.io import BridgeError, read_state_dict

__all__ = ["BridgeError", "export_files", "import_model", "import_params", "read_state_dict"]
