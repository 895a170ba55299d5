"""The package's ops: one public function per op, each with a plain-PyTorch reference beside it."""
from .hard_concrete import expected_l0, gate_noise, hard_concrete  # noqa: I001  (first: utils.checks needs it)
from .gate_stack import Gate
from .masked_attn_out_proj import masked_attn_out_proj
from .masked_linear import masked_linear
from .masked_mlp import masked_mlp

__all__ = ["hard_concrete", "expected_l0", "gate_noise", "masked_linear", "masked_attn_out_proj", "masked_mlp",
           "Gate"]
