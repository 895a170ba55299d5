"""FSDP2 scale-out (nodeprune_kernels.pruning.distributed): two CPU processes under torchrun (gloo), each with
a shard of a tiny Llama's weights and its share of every batch, train the gates exactly like one process on
the whole batch."""
import os
import subprocess
import sys

import pytest
import torch

from nodeprune_kernels.pruning import distributed as D

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(rank 0's results, rank 1's, the single-process results): the two ranks run while this process runs
    the single-process reference."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(HERE, "_dist_worker.py"), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        single = {run: W.train(run) for run in W.RUNS}
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, f"torchrun failed:\n{log[-6000:]}"
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt"), single


@pytest.mark.parametrize("run", list(W.RUNS))
def test_two_ranks_train_like_one_process(runs, run):
    r0, r1, single = runs[0][run], runs[1][run], runs[2][run]
    assert r0["sharded"] and r1["sharded"]  # the ranks hold half of each weight (FSDP2 DTensor shards)
    # one gate sample per step, the same on both ranks and in the single process (same seed, same steps)
    assert r0["steps"] == r1["steps"] == single["steps"] == [1, 2, 3]
    assert torch.equal(r0["samples"], r1["samples"])
    assert torch.equal(r0["samples"][0], single["samples"][0])  # later samples follow the (close) log_alphas
    torch.testing.assert_close(r0["samples"], single["samples"], rtol=0, atol=1e-5)
    assert 0 < (r0["samples"] == 0).sum() < r0["samples"].numel()  # some gates closed, some open
    # each rank its share of the batch; summed gradients = the full batch's (the loss over the global count)
    _, batch, _ = W.RUNS[run]
    assert torch.cat([r0["shares"], r1["shares"]]).tolist() == list(range(batch))
    nonzero = torch.cat([g.flatten() for g in single["grads1"].values()]) != 0
    assert nonzero.float().mean() > 0.1  # gates whose sample is not clamped to 0 or 1
    for k, g in single["grads1"].items():
        torch.testing.assert_close(r0["grads1"][k], g, rtol=1e-5, atol=1e-7, msg=k)
        assert torch.equal(r0["grads1"][k], r1["grads1"][k]), k
    for k, la in single["log_alpha"].items():
        torch.testing.assert_close(r0["log_alpha"][k], la, rtol=0, atol=1e-5, msg=k)
        assert torch.equal(r0["log_alpha"][k], r1["log_alpha"][k]), k
    # remove_node_pruning gives back the sharded model exactly, trainable again
    assert r0["restored"] == r1["restored"] == 0.0
    assert r0["frozen_after_remove"] == r1["frozen_after_remove"] == []


def test_shard_batch_shares(runs):
    r0, r1 = runs[0], runs[1]
    assert [r0["shares"][n].tolist() for n in (2, 5, 6)] == [[0], [0, 1, 2], [0, 1, 2]]
    assert [r1["shares"][n].tolist() for n in (2, 5, 6)] == [[1], [3, 4], [3, 4, 5]]
    assert "use a batch size of at least 2" in r0["too_small"]


def test_single_process_identities(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert D.dist_info() == (0, 1)
    assert D.init_from_env() is False
    idx = torch.arange(5)
    assert torch.equal(D.shard_batch(idx), idx)
    assert D.global_count(7).item() == 7
    t = torch.ones(3)
    assert torch.equal(D.all_reduce_sum(t), t)
    with pytest.raises(ValueError, match="1-D"):
        D.shard_batch(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="torchrun"):
        D.shard_model(torch.nn.Linear(2, 2), None)
