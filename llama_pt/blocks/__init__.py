"""The transformer block implementations an activation mode chooses from, and the bytes each keeps."""
from .checkpointed import CheckpointedBlock
from .memory import layer_activation_bytes, measure_saved_bytes
from .modes import apply_activation_mode
from .selective import SelectiveBlock, compile_elementwise

__all__ = ["CheckpointedBlock", "SelectiveBlock", "apply_activation_mode", "compile_elementwise",
           "layer_activation_bytes", "measure_saved_bytes"]
