"""The model layer: node pruning on Hugging Face causal LMs, the circuit, and cutting it out."""
from .circuit import Circuit
from .families import FAMILIES, REGISTRY, Family, ModelDims
from .masks import ABLATIONS, GRANULARITIES, NodeMasks
from .materialize import materialize
from .patch import apply_node_pruning, is_patched, node_masks, remove_node_pruning
from .saving import load_pruned, save_pruned

SUPPORTED_MODEL_TYPES = tuple(sorted(REGISTRY))

__all__ = ["apply_node_pruning", "remove_node_pruning", "node_masks", "is_patched", "NodeMasks", "Circuit",
           "GRANULARITIES", "ABLATIONS", "SUPPORTED_MODEL_TYPES", "FAMILIES", "Family", "ModelDims",
           "materialize", "save_pruned", "load_pruned"]
