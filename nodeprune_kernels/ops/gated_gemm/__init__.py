"""The gated GEMM engine shared by the masked projections (internal; the public ops wrap it)."""
from .kernels import MAX_LEVELS
from .launcher import (HIDDEN, TENSOR, VECTOR, Operand, Split, choose_split, feature_gates, fold_weight,
                       gated_matmul, hidden_delta, hidden_operand, level_grads, stack_gates, tensor_operand,
                       transient_dtype, vector_operand, weight_operand)

__all__ = ["MAX_LEVELS", "VECTOR", "TENSOR", "HIDDEN", "Operand", "Split", "choose_split", "tensor_operand",
           "vector_operand", "hidden_operand", "weight_operand", "feature_gates", "fold_weight", "hidden_delta",
           "stack_gates", "transient_dtype", "gated_matmul", "level_grads"]
