"""nodeprune-kernels: fused Triton kernels for multi-granular node pruning of Hugging Face causal LMs."""
from .model import (ABLATIONS, GRANULARITIES, SUPPORTED_MODEL_TYPES, Circuit, NodeMasks, apply_node_pruning,
                    is_patched, load_pruned, materialize, node_masks, remove_node_pruning,
                    save_pruned)
from .ops import Gate, expected_l0, gate_noise, hard_concrete, masked_attn_out_proj, masked_linear, masked_mlp
from .pruning.attribution import NodeScores, attribute
from .pruning.compare import compare_coarse_fine
from .pruning.config import PruneConfig
from .pruning.run import NonFiniteLossError, PruningResult, prune

__version__ = "0.1.0"
__all__ = ["Gate", "hard_concrete", "expected_l0", "gate_noise", "masked_linear", "masked_attn_out_proj",
           "masked_mlp", "apply_node_pruning", "remove_node_pruning", "node_masks", "is_patched", "NodeMasks",
           "Circuit", "GRANULARITIES", "ABLATIONS", "SUPPORTED_MODEL_TYPES", "materialize", "save_pruned",
           "load_pruned", "prune",
           "PruneConfig", "PruningResult", "attribute", "NodeScores", "NonFiniteLossError", "compare_coarse_fine", "__version__"]
