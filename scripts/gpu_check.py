#!/usr/bin/env python3
"""One prepared GPU proof: tests, self-check, per-op micro-benchmarks, pruning steps, the largest batch that fits.

    make gpu-check                                   # = PYTHONPATH=. python3 scripts/gpu_check.py
    PYTHONPATH=. python3 scripts/gpu_check.py --small --out /tmp/x   # the CPU smoke mode (CI), < 60 s

Runs from the working tree with the machine's own python (torch, triton, transformers, pytest installed; nothing
is installed, nothing is downloaded; every model has random weights built from a config). Each step is a
subprocess with a time limit: a step that fails or runs out of time is recorded and the next one runs. At the
end one summary table: each step's status and time, the headline numbers and the targets (met / missed).

Steps (full mode; H100 / H200, bf16, about 8 minutes at most, ``--budget``):
1. tests: ``pytest -q -x`` over the op and model-layer tests on CUDA (tests/conftest.py picks cuda when a GPU
   is visible; the float32 / float16 / bfloat16 parametrisations all run). The native-backend cases (CPU
   kernels, tested by CI) are deselected unless ``--tests-native``; with pytest-xdist present the tests are
   spread over ``--test-workers`` processes (default 4; Triton compiles each kernel specialisation once per
   process, so the compiles run in parallel).
2. selfcheck: ``python -m nodeprune_kernels selfcheck`` (every op against float64, the sm_90 / sm_80 builds).
3. ops: masked_linear against F.linear (forward, and forward + backward to x and the gates against F.linear's
   forward + backward to x) at Llama-3-8B's 4096 x 4096 and GPT-2 small's 768 x 768, and the fused masked MLP
   against the eager (reference-backend) masked MLP and the frozen unmasked MLP at Llama-3-8B's SwiGLU 4096 x
   14336 (8192 tokens) and GPT-2 small's gelu 768 x 3072 (2048 tokens); zero ablation, gates at every level,
   CUDA events, median of ``--reps``. Each fused case is first checked against the reference backend (loose
   tolerance: a wrong kernel, not rounding). -> gpu_check_ops_<device>.csv
4. pruning: one pruning step (benchmarks/bench_pruning_step.py: floor, eager, fused, edge; zero ablation, all
   seven granularities) at GPT-2 small 32 x 64, Llama-3.2-1B 8 x 256 and Llama-3-8B 8 x 1024: step time and
   peak memory against the floor. -> gpu_check_pruning_step_<model>_<device>.csv
5. fit: the largest batch x 1024 tokens whose step fits (bench_pruning_step.py --fit), fused node pruning and
   edge pruning, for the Llama-3-8B and CodeLlama-13B shapes. -> gpu_check_max_fit_<model>_<device>.csv

Every output goes to ``--out`` (default benchmarks/results): the CSVs, gpu_check_<device>.log (every step's
command and output) and gpu_check_summary_<device>.txt (the table). Exit status: 1 if a correctness step
(tests, selfcheck, the ops' check against the reference) failed or ran out of time, 2 if only a benchmark step
did not finish, else 0. Targets missed do not change it: they are measurements.

``--small``: the same steps on the CPU at tiny shapes (CUDA hidden), the Triton kernels in Triton's
interpreter: a handful of quick tests, no self-check (CI runs it), ops at 64 tokens, the pruning step of the
tiny GPT-2 and Llama, no fit (it measures GPU memory). It exists so that CI runs this script and it cannot
rot; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
TEST_FILES = ["tests/test_hard_concrete.py", "tests/test_masked_linear.py", "tests/test_masked_attn_out_proj.py",
              "tests/test_masked_mlp.py", "tests/test_model_layer.py"]
SMALL_TESTS_K = ("triton and (no_gates_is_linear or open_gates_equal_the_unmasked_mlp "
                 "or (hard_concrete_matches_reference and shape1))")

# (model, batch x seq) of the pruning step; (model) of the fit; time boxes in seconds (full mode)
PRUNE_POINTS = [("gpt2-small", "32x64"), ("llama-3.2-1b", "8x256"), ("llama-3-8b", "8x1024")]
FIT_MODELS = ["llama-3-8b", "codellama-13b"]
BOXES = {"info": 15, "tests": 150, "selfcheck": 40, "ops": 40, "prune gpt2-small": 30, "prune llama-3.2-1b": 30,
         "prune llama-3-8b": 50, "fit llama-3-8b": 45, "fit codellama-13b": 60}  # 460 s; a step also gets
# what the steps before it left unused (Runner.timeout_for), and all of them together stay within --budget
SMALL_BOXES = {"info": 30, "tests": 40, "ops": 40, "prune tiny": 40}

TARGETS = {"linear": 0.90, "mlp": 1.5, "step": 1.15}


# ------------------------------------------------------------------------------------------------ the runner

class Step:
    """One step's record: name, status (pass / fail / timeout / error / done / skipped), seconds, what it found."""

    def __init__(self, name, correctness=False):
        self.name, self.correctness = name, correctness
        self.status, self.seconds, self.result, self.rc, self.output = "skipped", 0.0, "", None, ""

    @property
    def failed(self):
        return self.status in ("fail", "timeout", "error")


class Runner:
    def __init__(self, args, boxes):
        self.args, self.boxes = args, boxes
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.order = list(boxes)
        self.log_path = None
        self._log = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = ROOT + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        self.env["PYTHONUNBUFFERED"] = "1"
        if args.small:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke mode is the CPU path, even on a GPU machine
            self.env["TRITON_INTERPRET"] = "1"

    def timeout_for(self, key):
        """The step's box plus what earlier steps left unused: the time to the deadline less the later boxes."""
        later = sum(self.boxes[k] for k in self.order[self.order.index(key) + 1:])
        return max(5.0, min(self.deadline - time.monotonic() - later, self.args.budget))

    def log(self, text):
        self._log.append(text)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(text if text.endswith("\n") else text + "\n")

    def run(self, step, key, cmd, quiet=False):
        """Run ``cmd`` (a list) from the repository root within the step's time; fills step.rc/output/status."""
        limit = self.timeout_for(key)
        if not quiet:
            print(f"[{self.elapsed():5.0f} s] {step.name}: {' '.join(cmd[1:])}  (limit {limit:.0f} s)", flush=True)
        self.log(f"\n===== {step.name} (limit {limit:.0f} s)\n$ {' '.join(cmd)}")
        t = time.monotonic()
        try:
            # its own process group: on a timeout the whole group goes (pytest-xdist workers, compilers), so
            # nothing is left holding the GPU for the next step
            p = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace", start_new_session=True)
        except OSError as e:
            p = None
            step.rc, step.status, step.output = None, "error", f"could not start: {e}"
        if p is not None:
            try:
                step.output, _ = p.communicate(timeout=limit)
                step.rc = p.returncode
                step.status = "pass" if p.returncode == 0 else "fail"
            except subprocess.TimeoutExpired:
                _kill_group(p)
                step.output, _ = p.communicate()
                step.rc, step.status = None, "timeout"
            except BaseException:  # Ctrl-C: take the step's processes down with us
                _kill_group(p)
                raise
        step.seconds += time.monotonic() - t
        self.log(step.output)
        self.log(f"----- {step.name}: {step.status} (rc {step.rc}) in {step.seconds:.1f} s")
        if step.status != "pass" and not quiet:
            tail = "\n".join(step.output.rstrip().splitlines()[-25:])
            print(f"  {step.status} after {step.seconds:.0f} s; last lines:\n" + "\n".join(f"    | {ln}" for ln in
                                                                                        tail.splitlines()),
                  flush=True)
        return step

    def elapsed(self):
        return time.monotonic() - self.t0


# --------------------------------------------------------------------------------------------------- steps

def python():
    return sys.executable or "python3"


def step_info(runner):
    """Device, versions, commit (benchmarks/common.py's env_row) from a subprocess: the parent never touches CUDA."""
    st = Step("info")
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import torch; "
            "from common import device_slug, env_row; r = env_row(); "
            "r.update(cuda=torch.cuda.is_available(), slug=device_slug()); print('INFO ' + json.dumps(r))")
    runner.run(st, "info", [python(), "-c", code], quiet=True)
    for line in st.output.splitlines():
        if line.startswith("INFO "):
            return json.loads(line[5:]), st
    return None, st


def step_tests(runner):
    args = runner.args
    st = Step("1 tests", correctness=True)
    notes = []
    cmd = [python(), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    if args.small:
        cmd += ["tests/test_hard_concrete.py", "tests/test_masked_linear.py", "tests/test_masked_mlp.py",
                "-k", SMALL_TESTS_K]
    else:
        cmd += [f for f in TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
        native = _native_buildable()
        if not native:  # the cross-backend tests would fail on the build, and -x would stop the suite there
            notes.append("no C++ compiler or ninja: native cases and the cross-backend gate tests deselected")
            cmd += ["-k", "not native and not backends_draw_identical_gates"]
        elif not args.tests_native:
            notes.append("native-backend cases deselected (CPU kernels; CI runs them)")
            cmd += ["-k", "not native"]
        if args.test_workers > 1 and _has_module("xdist"):
            cmd += ["-n", str(args.test_workers)]
            notes.append(f"{args.test_workers} xdist workers")
    runner.run(st, "tests", cmd)
    summary = [ln for ln in st.output.splitlines() if re.search(r"\d+ (passed|failed|error|deselected)", ln)]
    counts = summary[-1].strip().strip("=").strip() if summary else ""
    if st.status == "timeout":
        done = re.findall(r"\[\s*(\d+)%\]", st.output)
        progress = [ln.strip() for ln in st.output.splitlines() if re.fullmatch(r"[.FEsxX]+(\s+\[.*\])?", ln.strip())]
        fails = sum(ln.split()[0].count("F") + ln.split()[0].count("E") for ln in progress)
        counts = f"{done[-1] if done else '?'}% done when stopped, {fails} failed so far"
    elif st.rc == 5:  # no test collected: only possible with --small's selection (renamed tests)
        st.status, counts = "skipped", "no test matched the --small selection (tests renamed?): " + SMALL_TESTS_K
    st.result = "; ".join([counts] + notes)
    return st


def step_selfcheck(runner):
    st = Step("2 selfcheck", correctness=True)
    if runner.args.small:
        st.result = "skipped in --small (CI runs `nodeprune selfcheck` itself)"
        return st
    runner.run(st, "selfcheck", [python(), "-m", "nodeprune_kernels", "selfcheck"])
    rows = [ln for ln in st.output.splitlines() if ln.rstrip().endswith((" yes", " NO"))]
    bad = sum(ln.rstrip().endswith(" NO") for ln in rows)
    st.result = f"{len(rows) - bad}/{len(rows)} op checks within tolerance" if rows else ""
    return st


def step_ops(runner, slug):
    st = Step("3 ops", correctness=True)
    out = os.path.join(runner.args.out, f"gpu_check_ops_{slug}.csv")
    cmd = [python(), os.path.abspath(__file__), "--worker", "ops", "--out", runner.args.out, "--slug", slug,
           "--reps", str(runner.args.reps)] + (["--small"] if runner.args.small else [])
    _remove(out)
    runner.run(st, "ops", cmd)
    st.csv = out if os.path.exists(out) else None
    st.headlines = ops_headlines(read_csv(st.csv)) if st.csv else {}
    bad = {(r.get("op"), r.get("shape")) for r in read_csv(st.csv) if r.get("check_ok") == "False"}
    if bad:
        st.status = "fail"
    st.result = "; ".join(filter(None, [st.headlines.get("text", ""), "failed (wrong or crashed, see the log): "
                                        + ", ".join(f"{op} {shape}" for op, shape in sorted(bad)) if bad else ""]))
    return st


def step_prune(runner, slug, models, point, key, label):
    a = runner.args
    st = Step(f"4 pruning {label} {point}")
    out = os.path.join(a.out, f"gpu_check_pruning_step_{label}_{slug}.csv")
    cmd = [python(), os.path.join(BENCH, "bench_pruning_step.py"), "--models", models, "--points", point,
           "--modes", "floor,eager,fused,edge", "--ablations", "zero", "--granularities", "all",
           "--repeats", str(a.step_repeats), "--warmup", "0" if a.small else "1", "--out", out]
    if a.small:
        cmd += ["--fused-backend", "triton"]
    _remove(out)
    runner.run(st, key, cmd)
    st.csv = out if os.path.exists(out) else None
    if st.status == "pass":
        st.status = "done"
    st.headlines = prune_headlines(read_csv(st.csv)) if st.csv else {}
    st.result = "; ".join(h["text"] for h in st.headlines.values())
    return st


def step_fit(runner, slug, model):
    a = runner.args
    st = Step(f"5 fit {model} x{a.fit_seq}")
    if a.small:
        st.result = "skipped in --small (--fit measures GPU memory)"
        return st
    out = os.path.join(a.out, f"gpu_check_max_fit_{model}_{slug}.csv")
    cmd = [python(), os.path.join(BENCH, "bench_pruning_step.py"), "--fit", "--models", model,
           "--modes", a.fit_modes, "--ablations", "zero", "--granularities", "all", "--fit-seq", str(a.fit_seq),
           "--fit-cap", str(a.fit_cap), "--out", out]
    _remove(out)
    runner.run(st, f"fit {model}", cmd)
    st.csv = out if os.path.exists(out) else None
    if st.status == "pass":
        st.status = "done"
    st.headlines = fit_headlines(read_csv(st.csv)) if st.csv else {}
    if not st.csv and st.status == "timeout":  # the CSV is written at the end: report what the log shows
        fits = re.findall(r"^\s+(\w+) \S+ \S+ batch (\d+) x \d+: fits$", st.output, re.M)
        best = {}
        for mode, b in fits:
            best[mode] = max(best.get(mode, 0), int(b))
        st.headlines = {m: {"max_batch": b, "text": f"{m} >= {b} (stopped)"} for m, b in best.items()}
    st.result = ", ".join(h["text"] for h in st.headlines.values())
    return st


# ---------------------------------------------------------------------------------------- reading the CSVs

def read_csv(path):
    if not path or not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def ops_headlines(rows):
    """{"linear": {shape: ratio}, "linear_fb": {...}, "mlp": {shape: speedup}, "text": "..."} from the ops CSV."""
    h = {"linear": {}, "linear_fb": {}, "mlp": {}}
    for r in rows:
        if r.get("impl") == "masked_linear fused" and _num(r.get("throughput_vs_F.linear")) is not None:
            h["linear" if r["phase"] == "fwd" else "linear_fb"][r["shape"]] = _num(r["throughput_vs_F.linear"])
        if r.get("impl") == "masked_mlp fused" and r.get("phase") == "fwd+bwd" \
                and _num(r.get("speedup_vs_eager")) is not None:
            h["mlp"][r["shape"]] = _num(r["speedup_vs_eager"])
    parts = [f"masked_linear {s}: {v:.0%} of F.linear fwd" + (f", {h['linear_fb'][s]:.0%} fwd+bwd"
                                                               if s in h["linear_fb"] else "")
             for s, v in h["linear"].items()]
    parts += [f"fused MLP {s}: {v:.2f}x eager" for s, v in h["mlp"].items()]
    h["text"] = "; ".join(parts)
    return h


def prune_headlines(rows):
    """{model: {"fused": x floor, "eager": ..., "edge": ..., "peak": fused peak / floor peak, "text": ...}}."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mr = {r["mode"]: r for r in rows if r["model"] == model and r.get("ablation") in ("zero", "-")
              and r.get("granularities") in ("all", "edges", "-")}
        h = {"point": ""}
        floor = mr.get("floor", {})
        fp = _num(floor.get("peak_allocated_bytes"))
        for mode in ("eager", "fused", "edge"):
            r = mr.get(mode)
            if r is None:
                h[mode] = None
            elif str(r.get("out_of_memory")) == "True":
                h[mode] = "oom"
            else:
                h[mode] = _num(r.get("time_vs_floor"))
            if r is not None and fp and _num(r.get("peak_allocated_bytes")):
                h[mode + "_peak"] = _num(r["peak_allocated_bytes"]) / fp
        if floor:
            h["point"] = f"{floor.get('batch')}x{floor.get('seq')}"
            h["floor_ms"] = _num(floor.get("median_ms"))

        def fmt(mode):
            v = h.get(mode)
            if v is None:
                return f"{mode} -"
            if v == "oom":
                return f"{mode} out of memory"
            peak = f", peak {h[mode + '_peak']:.2f}x" if h.get(mode + "_peak") else ""
            return f"{mode} {v:.2f}x{peak}"
        floor_ms = f"floor {h['floor_ms']:.1f} ms" if h.get("floor_ms") else "floor -"
        h["text"] = f"{model} {h['point']}: {floor_ms}; " + ", ".join(fmt(m) for m in ("fused", "eager", "edge")) \
            + " (time vs floor)"
        out[model] = h
    return out


def fit_headlines(rows):
    """{mode: {"max_batch": n, "seq": s, "text": ...}} from a --fit CSV (one model)."""
    out = {}
    for r in rows:
        b = int(_num(r.get("max_batch")) or 0)
        cap = int(_num(r.get("fit_cap_batch")) or 0)
        out[r["mode"]] = {"max_batch": b, "seq": r.get("seq"),
                          "text": f"{r['mode']} {b} x {r.get('seq')}" + (" (the cap)" if cap and b >= cap else "")}
    return out


def _kill_group(p):
    """SIGKILL the process group of ``p`` (started with start_new_session: it leads its own group)."""
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _native_buildable():
    """Whether the native C++ kernels can be built here: a compiler ($CXX, c++ or g++) and ninja."""
    import shutil

    cxx = os.environ.get("CXX")
    return bool((cxx and shutil.which(cxx)) or shutil.which("c++") or shutil.which("g++")) and \
        (_has_module("ninja") or bool(shutil.which("ninja")))


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------- summary

def summary(info, steps, args, total):
    dev = info.get("device", "?") if info else "?"
    mem = f" ({info['device_memory_gib']} GiB)" if info and info.get("device_memory_gib") else ""
    lines = [f"gpu-check summary{' (--small: CPU smoke mode, numbers mean nothing)' if args.small else ''}",
             f"device {dev}{mem}; torch {info.get('torch')}, triton "
             f"{info.get('triton')}, transformers {info.get('transformers')}; commit {info.get('commit')}, "
             f"{info.get('date')}; total {total:.0f} s" if info else "device info unavailable"]
    w = max(len(s.name) for s in steps) + 2
    lines.append(f"{'step':<{w}} {'status':<8} {'time':>6}  result")
    lines.append("-" * (w + 70))
    for s in steps:
        lines.append(f"{s.name:<{w}} {s.status:<8} {s.seconds:5.0f}s  {s.result}")
    lines.append("")
    lines.append(f"{'target':<52} {'measured':>14}  status")
    lines.append("-" * 76)
    by = {s.name.split()[0]: s for s in steps}

    def target(label, value, ok):
        status = "not measured" if value is None else ("met" if ok else "missed")
        lines.append(f"{label:<52} {value if value is not None else '-':>14}  {status}")

    ops = getattr(by.get("3"), "headlines", {}) or {}
    for s, v in ops.get("linear", {}).items():
        target(f"masked_linear fwd >= 90% of F.linear ({s})", f"{v:.0%}", v >= TARGETS["linear"])
    for s, v in ops.get("linear_fb", {}).items():
        target(f"  fwd+bwd >= 90% of F.linear fwd+bwd ({s})", f"{v:.0%}", v >= TARGETS["linear"])
    if not ops.get("linear"):
        target("masked_linear >= 90% of F.linear", None, False)
    for s, v in ops.get("mlp", {}).items():
        target(f"fused MLP fwd+bwd >= 1.5x eager ({s})", f"{v:.2f}x", v >= TARGETS["mlp"])
    if not ops.get("mlp"):
        target("fused MLP fwd+bwd >= 1.5x eager", None, False)
    for s in steps:
        if s.name.startswith("4 "):
            hs = getattr(s, "headlines", {}) or {}
            if not hs:
                target(f"pruning step <= 1.15x floor ({s.name[10:]})", None, False)
            for model, h in hs.items():
                v = h.get("fused")
                val = None if v in (None, "oom") else f"{v:.2f}x"
                target(f"pruning step <= 1.15x floor ({model} {h['point']})", val,
                       val is not None and v <= TARGETS["step"])
    lines.append("")
    lines.append("largest batch x seq that fits (fused node pruning; edge pruning for contrast):")
    for s in steps:
        if s.name.startswith("5 "):
            hs = getattr(s, "headlines", {}) or {}
            model = s.name.split()[2]
            got = ", ".join(h["text"] for h in hs.values()) if hs else (s.result or s.status)
            lines.append(f"  {model:<16} {got}")
    failed_c = [s.name for s in steps if s.correctness and s.failed]
    failed_b = [s.name for s in steps if not s.correctness and s.failed]
    lines.append("")
    lines.append("correctness: " + ("FAILED: " + ", ".join(failed_c) if failed_c else "passed")
                 + ("; benchmark steps not finished: " + ", ".join(failed_b) if failed_b else ""))
    return "\n".join(lines), (1 if failed_c else 2 if failed_b else 0)


# --------------------------------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--small", action="store_true", help="the CPU smoke mode (tiny shapes, Triton's interpreter)")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"), help="where the CSVs, log and summary go")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 470; --small 170)")
    ap.add_argument("--skip", default="", help="comma list of steps not to run: tests,selfcheck,ops,prune,fit")
    ap.add_argument("--tests-native", action="store_true", help="also run the native-backend (CPU) test cases")
    ap.add_argument("--test-workers", type=int, default=4, help="pytest-xdist workers when xdist is installed")
    ap.add_argument("--reps", type=int, default=None, help="ops: timed calls per case (default 20; --small 2)")
    ap.add_argument("--step-repeats", type=int, default=None, help="pruning: timed steps per mode (default 4, after 3 "
                                                              "untimed)")
    ap.add_argument("--fit-seq", type=int, default=1024)
    ap.add_argument("--fit-cap", type=int, default=512, help="--fit: the largest batch tried")
    ap.add_argument("--fit-modes", default="fused,edge")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--slug", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out)
    args.reps = args.reps or (2 if args.small else 20)
    args.step_repeats = args.step_repeats or (1 if args.small else 4)
    if args.worker == "ops":
        return ops_worker(args)
    args.budget = args.budget or (170.0 if args.small else 470.0)
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)

    boxes = dict(SMALL_BOXES if args.small else BOXES)
    for name in skip:
        for k in [k for k in boxes if k.split()[0] == name]:
            boxes.pop(k)
    runner = Runner(args, boxes)
    info, info_step = step_info(runner)
    if info is None:
        print(info_step.output[-3000:])
        sys.exit("gpu-check: could not read the device and versions (python -c 'import torch' failed?); see above")
    if not info["cuda"] and not args.small:
        sys.exit("no CUDA GPU: run with --small for the CPU smoke mode, or run on a GPU machine")
    slug = info["slug"]
    runner.log_path = os.path.join(args.out, f"gpu_check_{slug}.log")
    _remove(runner.log_path)
    runner.log(f"gpu-check {' '.join(sys.argv[1:])}\n{json.dumps(info)}")
    print(f"gpu-check on {info['device']} ({slug}); outputs in {args.out}; budget {args.budget:.0f} s", flush=True)

    steps = []
    if "tests" not in skip:
        steps.append(step_tests(runner))
    if "selfcheck" not in skip:
        steps.append(step_selfcheck(runner))
    if "ops" not in skip:
        steps.append(step_ops(runner, slug))
    if "prune" not in skip:
        if args.small:
            steps.append(step_prune(runner, slug, "tiny-gpt2,tiny-llama", "2x32", "prune tiny", "tiny"))
        else:
            for model, point in PRUNE_POINTS:
                steps.append(step_prune(runner, slug, model, point, f"prune {model}", model))
    if "fit" not in skip:
        for model in (["llama-3-8b"] if args.small else FIT_MODELS):
            steps.append(step_fit(runner, slug, model))

    text, code = summary(info, steps, args, runner.elapsed())
    path = os.path.join(args.out, f"gpu_check_summary_{slug}.txt")
    with open(path, "w") as f:
        f.write(text + "\n")
    runner.log("\n" + text)
    print("\n" + text)
    print(f"\nwrote {path} and {runner.log_path}")
    return code


# ------------------------------------------------------------------------------------- the ops micro-benchmarks

def ops_worker(args):
    """Step 3 in its own process: time masked_linear and masked_mlp, check them, write the CSV."""
    if args.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    import statistics

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, BENCH)
    from common import env_row, write_csv

    from nodeprune_kernels import Gate, masked_linear, masked_mlp
    from nodeprune_kernels.utils.testing import rel_err

    cuda = torch.cuda.is_available() and not args.small
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter computes in numpy: float32
    tol = 0.1 if dtype == torch.bfloat16 else 1e-3
    warmup, reps = (3, args.reps) if cuda else (1, args.reps)
    base = env_row()
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    def gate(n, group, offset):
        la = (torch.randn(n, generator=gen) * 1.5 + 1.0).to(device).requires_grad_()
        return Gate(la, group, offset)

    def timed(fn):
        """Median and minimum ms of ``reps`` calls after ``warmup`` (CUDA events on a GPU)."""
        for _ in range(warmup):
            fn()
        times = []
        if cuda:
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for s, e in ev:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in ev]
        else:
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times), min(times)

    def check(run_fused, run_ref, leaves, dy):
        y = run_fused()
        g = torch.autograd.grad(y, leaves, dy)
        y_r = run_ref()
        g_r = torch.autograd.grad(y_r, leaves, dy)
        return max(rel_err(a, b) for a, b in zip((y, *g), (y_r, *g_r)) if b.abs().max() > 0)

    rows = []
    fused_backend = "triton"
    if cuda:
        linears = [("llama-3-8b 4096x4096", 8192, 4096, 4096, 32, False),
                   ("gpt2-small 768x768", 2048, 768, 768, 12, True)]
        mlps = [("llama-3-8b swiglu 4096x14336", 8192, 4096, 14336, True), ("gpt2-small gelu 768x3072", 2048, 768,
                                                                           3072, False)]
    else:
        linears = [("tiny 64x48", 64, 64, 48, 4, True)]
        mlps = [("tiny swiglu 32x64", 64, 32, 64, True), ("tiny gelu 32x64", 64, 32, 64, False)]

    def record(op, shape, tokens, dims, phase, impl, backend, ms, flops, **extra):
        med, mn = ms
        rows.append({**base, "op": op, "shape": shape, "dtype": str(dtype)[6:], "tokens": tokens, **dims,
                     "ablation": "zero", "phase": phase, "impl": impl, "backend": backend, "reps": reps,
                     "median_ms": round(med, 4), "min_ms": round(mn, 4),
                     "tflops": round(flops / (med * 1e-3) / 1e12, 2), **extra})
        print(f"{op:<13} {shape:<30} {phase:<8} {impl:<24} {med:9.3f} ms  {flops / (med * 1e-3) / 1e12:7.1f} "
              "TFLOP/s", flush=True)

    def linear_case(shape, M, K, N, heads, bias):
        x = randn(M, K).requires_grad_()
        w = randn(N, K, scale=K ** -0.5)
        b = randn(N, scale=0.02) if bias else None
        in_gates = [gate(1, K, 0), gate(heads, K // heads, 1), gate(K, 1, 1 + heads)]  # layer, head, neuron
        out_gates = [gate(N, 1, 1 + heads + K)]
        leaves = [x] + [g.log_alpha for g in in_gates + out_gates]
        dy = randn(M, N)

        def ml(backend):
            return masked_linear(x, w, b, in_gates=in_gates, out_gates=out_gates, seed=3, backend=backend)

        err = check(lambda: ml(fused_backend), lambda: ml("reference"), leaves, dy)
        ok = err <= tol
        dims = {"d_in": K, "d_out": N}
        flops = 2 * M * K * N
        t_f = timed(lambda: F.linear(x, w, b))
        t_m = timed(lambda: ml(fused_backend))
        record("masked_linear", shape, M, dims, "fwd", "F.linear", "", t_f, flops)
        record("masked_linear", shape, M, dims, "fwd", "masked_linear fused", fused_backend, t_m, flops,
               **{"throughput_vs_F.linear": round(t_f[0] / t_m[0], 4), "check_err": f"{err:.3g}", "check_ok": ok})
        t_fb = timed(lambda: torch.autograd.grad(F.linear(x, w, b), [x], dy))
        t_mb = timed(lambda: torch.autograd.grad(ml(fused_backend), leaves, dy))
        record("masked_linear", shape, M, dims, "fwd+bwd", "F.linear", "", t_fb, 2 * flops)
        record("masked_linear", shape, M, dims, "fwd+bwd", "masked_linear fused", fused_backend, t_mb, 2 * flops,
               **{"throughput_vs_F.linear": round(t_fb[0] / t_mb[0], 4), "check_err": f"{err:.3g}", "check_ok": ok})
        return ok

    def mlp_case(shape, M, D, Dff, gated):
        layout = "out_in" if gated else "in_out"  # Llama nn.Linear; GPT-2 Conv1D
        act = "silu" if gated else "gelu_tanh"

        def weight(n_out, n_in):
            w = randn(n_out, n_in, scale=n_in ** -0.5)
            return w if layout == "out_in" else w.t().contiguous()

        up, down = weight(Dff, D), weight(D, Dff)
        gw = weight(Dff, D) if gated else None
        b_up = None if gated else randn(Dff, scale=0.02)
        b_down = None if gated else randn(D, scale=0.02)
        x = randn(M, D).requires_grad_()
        in_gates = [gate(1, Dff, 0), gate(1, Dff, 1), gate(Dff, 1, 2)]  # layer, mlp, mlp_neuron
        out_gates = [gate(D, 1, 2 + Dff)]  # mlp_out
        leaves = [x] + [g.log_alpha for g in in_gates + out_gates]
        dy = randn(M, D)

        def mm(backend):
            return masked_mlp(x, up, down, gate_weight=gw, up_bias=b_up, down_bias=b_down, activation=act,
                              in_gates=in_gates, out_gates=out_gates, seed=9, weight_layout=layout, backend=backend)

        def lin(t, w_, b_):
            return F.linear(t, w_ if layout == "out_in" else w_.t(), b_)

        def frozen():
            u = lin(x, up, b_up)
            h = F.silu(lin(x, gw, None)) * u if gated else F.gelu(u, approximate="tanh")
            return lin(h, down, b_down)

        err = check(lambda: mm(fused_backend), lambda: mm("reference"), leaves, dy)
        ok = err <= tol
        dims = {"d_model": D, "d_ff": Dff}
        flops = 2 * M * D * Dff * (3 if gated else 2)
        impls = (("frozen MLP", frozen, [x]), ("masked_mlp eager", lambda: mm("reference"), leaves),
                 ("masked_mlp fused", lambda: mm(fused_backend), leaves))
        for phase, mult in (("fwd", 1), ("fwd+bwd", 2)):
            t = {}
            for impl, fn, wrt in impls:
                t[impl] = timed(fn if phase == "fwd" else (lambda fn=fn, wrt=wrt: torch.autograd.grad(fn(), wrt, dy)))
            t_b, t_e, t_u = t["frozen MLP"], t["masked_mlp eager"], t["masked_mlp fused"]
            record("masked_mlp", shape, M, dims, phase, "frozen MLP", "", t_b, mult * flops)
            record("masked_mlp", shape, M, dims, phase, "masked_mlp eager", "reference", t_e, mult * flops,
                   time_vs_frozen=round(t_e[0] / t_b[0], 4))
            record("masked_mlp", shape, M, dims, phase, "masked_mlp fused", fused_backend, t_u, mult * flops,
                   speedup_vs_eager=round(t_e[0] / t_u[0], 4), time_vs_frozen=round(t_u[0] / t_b[0], 4),
                   check_err=f"{err:.3g}", check_ok=ok)
        return ok

    failed = False
    name = f"gpu_check_ops_{args.slug}.csv"
    path = os.path.join(args.out, name)
    cases = [("masked_linear", linear_case, c) for c in linears] + [("masked_mlp", mlp_case, c) for c in mlps]
    for op, fn, case in cases:
        try:
            ok = fn(*case)
        except Exception as e:  # noqa: BLE001 - recorded, and the next shape still runs
            import traceback

            traceback.print_exc()
            rows.append({**base, "op": op, "shape": case[0], "dtype": str(dtype)[6:], "impl": "error",
                         "check_ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            ok = False
        failed |= not ok
        if cuda:
            torch.cuda.empty_cache()
        write_csv(rows, name, path)  # after every shape: a later crash or timeout keeps what was measured
    print("wrote", path)
    if failed:
        print("a fused op differs from its reference beyond the loose tolerance, or a case failed (check_err, error)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
