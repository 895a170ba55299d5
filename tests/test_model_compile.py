"""torch.compile of a patched model: one graph with the fused ops in it, no recompile per gate sample."""
import pytest
import torch
from torch._dynamo.utils import counters

import nodeprune_kernels as npk
from tiny_models import tiny_batch, tiny_model

from helpers import GATE_GRAD_TOL, assert_close


def _steps(model, masks, ids, n, corrupt=None):
    out = []
    for _ in range(n):
        masks.zero_grad(set_to_none=True)
        y = model(ids).logits
        (y ** 2).mean().backward()
        out.append((y.detach(), {g: la.grad.clone() for g, la in masks.log_alpha.items()}))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compiled_training_steps_match_eager(family):
    ids = tiny_batch(seq=5)
    eager_model = tiny_model(family)
    eager_masks = npk.apply_node_pruning(eager_model, backend="triton", seed=4, init_log_alpha=0.5)
    eager = _steps(eager_model, eager_masks, ids, 3)

    model = tiny_model(family)
    masks = npk.apply_node_pruning(model, backend="triton", seed=4, init_log_alpha=0.5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        got = _steps(compiled, masks, ids, 3)
        # the first steps compile with the step as a constant, then as a symbol; no recompiles after that
        graphs = counters["stats"]["unique_graphs"]
        _steps(compiled, masks, ids, 3)
    assert counters["stats"]["unique_graphs"] == graphs <= 3, dict(counters["stats"])
    assert masks.step == 6
    for (y, g), (y_ref, g_ref) in zip(got, eager):
        assert_close(y, y_ref, torch.float32, "logits")
        for name in g_ref:
            if g_ref[name].any():
                assert_close(g[name], g_ref[name], torch.float32, name, tols=GATE_GRAD_TOL)
            else:
                assert not g[name].any()
    assert not torch.equal(got[0][0], got[1][0])  # a fresh sample per step
    torch._dynamo.reset()
