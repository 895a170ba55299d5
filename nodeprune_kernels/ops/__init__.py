"""The package's ops: one public function per op, each with a plain-PyTorch reference beside it."""
from .hard_concrete import expected_l0, gate_noise, hard_concrete
from .masked_linear import Gate, masked_linear

__all__ = ["hard_concrete", "expected_l0", "gate_noise", "masked_linear", "Gate"]
