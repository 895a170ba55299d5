"""FSDP2 scale-out (nodeprune_kernels.pruning.distributed): two CPU processes under torchrun (gloo), each with
a shard of a tiny Llama's weights and its share of every batch, train the gates exactly like one process on
the whole batch; the whole pruning run (``prune``, and ``nodeprune prune``) under torchrun gives one
process's gates, circuit and log, written by rank 0 alone, and a run SIGKILLed under torchrun (launcher and
ranks) resumes under torchrun with nothing lost."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nodeprune_kernels.pruning import distributed as D

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "TRITON_INTERPRET"):
        env.pop(k, None)
    return env


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie that nobody reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list:
    """The pids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            pass
    return out


def _kill_all(launcher: int) -> list:
    """SIGKILL torchrun and its ranks, each rank's process group too (torchrun starts every rank in a session of
    its own, so killing torchrun's group does not reach them); returns the ranks' pids. torchrun is stopped
    first, so that it neither reacts to its ranks' deaths nor starts new ones."""
    try:
        os.kill(launcher, signal.SIGSTOP)
    except ProcessLookupError:
        return []
    ranks = _children(launcher)
    for pid in [launcher] + ranks:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return ranks


def _torchrun(args, reference=lambda: None, timeout=180):
    """torchrun (2 ranks) of ``args`` while this process computes ``reference()``: (its result, the log)."""
    proc = subprocess.Popen(TORCHRUN + args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        result = reference()
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # an error or a timeout: no rank is left running
            _kill_all(proc.pid)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, f"torchrun failed:\n{log[-6000:]}"
    return result, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(rank 0's results, rank 1's, the single-process results): the two ranks run while this process runs
    the single-process reference."""
    out = tmp_path_factory.mktemp("dist")
    single, _ = _torchrun([os.path.join(HERE, "_dist_worker.py"), str(out)],
                          lambda: {run: W.train(run) for run in W.RUNS}, timeout=120)
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


# ------------------------------------------------------------------------------------------ prune() under torchrun
@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """``prune`` under torchrun (OUT/whole straight through, OUT/resumed interrupted after step 5 and resumed;
    see _dist_worker.main_prune) and, meanwhile in this process, the same run single-process (SINGLE/whole).
    Returns (OUT, SINGLE, rank 0's results, rank 1's, the single-process results)."""
    out, single_dir = tmp_path_factory.mktemp("dist_prune"), tmp_path_factory.mktemp("single_prune")
    single, _ = _torchrun([os.path.join(HERE, "_dist_worker.py"), "prune", str(out)],
                          lambda: W.run_prune(single_dir / "whole"))
    load = lambda r: torch.load(out / f"prune_rank{r}.pt", weights_only=False)  # noqa: E731
    return out, single_dir, load(0), load(1), single


RUN_FILES = ("config.json", "checkpoint.pt", "gates.safetensors", "circuit.json", "metrics.json", "history.json")


def test_prune_under_torchrun_rank0_writes_the_run(pruned):
    from nodeprune_kernels.pruning.outputs import load_gates

    out, _, r0, r1, _ = pruned
    assert r0["world"] == r1["world"] == 2
    assert r0["whole"]["sharded"] and r1["whole"]["sharded"]
    # rank 1 creates, renames and opens for writing nothing under the run directories; rank 0 writes them
    assert r1["writes"] == []
    for run in ("whole", "resumed"):
        assert {f"{run}/{name}" for name in RUN_FILES + ("curve.png",)} <= set(r0["writes"]), run
        assert all((out / run / name).is_file() for name in RUN_FILES), run
    # the ranks end with the same gates, log, circuit and metrics; the files are rank 0's
    for run in ("whole", "resumed"):
        a, b = r0[run], r1[run]
        assert a["log_alpha"].keys() == b["log_alpha"].keys()
        assert all(torch.equal(a["log_alpha"][g], b["log_alpha"][g]) for g in a["log_alpha"]), run
        assert a["history"] == b["history"] and a["circuit"] == b["circuit"] and a["metrics"] == b["metrics"], run
        gates = load_gates(out / run / "gates.safetensors")
        assert all(torch.equal(gates[g], a["log_alpha"][g]) for g in a["log_alpha"]), run
        assert json.loads((out / run / "circuit.json").read_text()) == a["circuit"]
        assert json.loads((out / run / "history.json").read_text()) == a["history"]
    assert [h["step"] for h in r0["whole"]["history"]] == list(range(1, W.PRUNE["steps"] + 1))
    # interrupted after step 5 (checkpoint at step 4), resumed by every rank from rank 0's checkpoint: nothing lost
    assert r0["whole"]["steps_run"] == r1["whole"]["steps_run"] == list(range(W.PRUNE["steps"]))
    assert r0["resumed"]["steps_run"] == r1["resumed"]["steps_run"] == [4, 5]  # steps 5 and 6, from step 4's state
    assert torch.load(out / "resumed" / "checkpoint.pt", weights_only=True)["step"] == W.PRUNE["steps"]
    assert r0["resumed"]["history"] == r0["whole"]["history"]
    whole, resumed = r0["whole"]["log_alpha"], r0["resumed"]["log_alpha"]
    assert all(torch.equal(resumed[g], whole[g]) for g in whole)


def test_prune_two_ranks_match_one_process(pruned):
    from nodeprune_kernels.pruning.outputs import load_gates

    out, single_dir, r0, _, single = pruned
    dist_gates, one_gates = load_gates(out / "whole" / "gates.safetensors"), load_gates(single_dir / "whole" /
                                                                                         "gates.safetensors")
    assert dist_gates.keys() == one_gates.keys() == set(W.prune_config().granularities)
    # the same steps logged, the same values (the objective over the whole batch, the sparsity term, the lambdas)
    h2, h1 = r0["whole"]["history"], single["history"]
    assert [h["step"] for h in h2] == [h["step"] for h in h1] == list(range(1, W.PRUNE["steps"] + 1))
    for a, b in zip(h2, h1):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    for g, la in one_gates.items():
        torch.testing.assert_close(dist_gates[g], la, rtol=0, atol=1e-5, msg=g)
    assert (json.loads((out / "whole" / "circuit.json").read_text())
            == json.loads((single_dir / "whole" / "circuit.json").read_text()))
    for k, v in single["metrics"].items():
        assert r0["whole"]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_a_killed_torchrun_run_resumes_with_nothing_lost(pruned, tmp_path):
    """torchrun and both ranks SIGKILLed mid-run, after the step-4 checkpoint; torchrun again on the run directory
    resumes it, and the run ends exactly as the uninterrupted two-rank run (``pruned``'s OUT/whole) did."""
    from nodeprune_kernels.pruning.outputs import load_gates

    whole, run = pruned[0] / "whole", tmp_path / "killed"
    args = [os.path.join(HERE, "_dist_worker.py"), "killable", str(run)]
    proc = subprocess.Popen(TORCHRUN + args + ["slow"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stdout.read()[-6000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into step 5 (steps 5 and 6 take W.SLOW_S each)
    finally:
        ranks = _kill_all(proc.pid)
        proc.communicate(timeout=60)  # the ranks write to torchrun's stdout: EOF once every one is gone
    deadline = time.monotonic() + 30
    while any(map(_alive, ranks)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(ranks) == 2 and not any(map(_alive, ranks)), f"ranks {ranks}: one survived SIGKILL"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4  # killed between steps 4 and 6
    assert not (run / "circuit.json").exists() and not (run / "metrics.json").exists()

    _, log = _torchrun(args)  # resumes from rank 0's checkpoint: steps 5 and 6 (0-based 4, 5)
    assert "rank 0 trained steps [4, 5]" in log and "rank 1 trained steps [4, 5]" in log, log[-6000:]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == W.PRUNE["steps"]
    a, b = load_gates(run / "gates.safetensors"), load_gates(whole / "gates.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[g], b[g]) for g in a)
    for name in ("history.json", "circuit.json", "metrics.json"):
        assert json.loads((run / name).read_text()) == json.loads((whole / name).read_text()), name


def test_nodeprune_prune_cli_under_torchrun(tmp_path):
    """``nodeprune prune`` (python -m nodeprune_kernels) under torchrun on a tiny Llama saved to disk."""
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    _, log = _torchrun(["-m", "nodeprune_kernels", "prune", "--model", str(tmp_path / "model"), "--task", "induction",
                        "--out", str(run), "--device", "cpu", "--backend", "reference", "--steps", "4",
                        "--batch-size", "5", "--n-examples", "24", "--n-eval", "8", "--task-options", "prefix_len=6",
                        "--no-progress"])
    assert log.count("written to") == 1 and log.count("held-out (8 examples)") == 1  # rank 0 prints
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [4]
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["steps"] == 4 and saved["n_train"] == 16 and saved["n_eval"] == 8
    import nodeprune_kernels as npk

    assert npk.Circuit.from_json(str(run / "circuit.json")).dims.n_layers == 2
