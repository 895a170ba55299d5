"""nodeprune-kernels: fused Triton kernels for multi-granular node pruning of Hugging Face causal LMs."""
from .model import (ABLATIONS, GRANULARITIES, SUPPORTED_MODEL_TYPES, Circuit, NodeMasks, apply_node_pruning,
                    node_masks, remove_node_pruning)
from .model import materialize
from .ops import Gate, expected_l0, gate_noise, hard_concrete, masked_attn_out_proj, masked_linear, masked_mlp

__version__ = "0.1.0"
__all__ = ["Gate", "hard_concrete", "expected_l0", "gate_noise", "masked_linear", "masked_attn_out_proj",
           "masked_mlp", "apply_node_pruning", "remove_node_pruning", "node_masks", "NodeMasks", "Circuit",
           "GRANULARITIES", "ABLATIONS", "SUPPORTED_MODEL_TYPES", "__version__",
           "materialize"]
