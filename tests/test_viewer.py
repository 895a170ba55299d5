"""circuit.html: the data the page embeds (parsed back out), its errors, the CLI, and the page itself in a
real browser (Debian's headless chromium through selenium and chromium-driver).

The run directory is written by ``outputs.write_results`` from gates made up here (a seeded mixture of open,
closed and in-between gates over three layers, two granularities left ungated), so every branch of the page
shows up: kept and closed heads and MLPs, implied granularities, a non-finite metric, and a task name that
would end the page's script tag if the data were not escaped.
"""
import base64
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from nodeprune_kernels.cli import main
from nodeprune_kernels.model.circuit import Circuit
from nodeprune_kernels.model.families import ModelDims
from nodeprune_kernels.model.masks import gate_shapes
from nodeprune_kernels.ops.hard_concrete.reference import hard_concrete_reference
from nodeprune_kernels.pruning import outputs, viewer
from nodeprune_kernels.pruning.config import PruneConfig
from nodeprune_kernels.pruning.run import PruningResult

DIMS = ModelDims(n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_model=32, d_ff=48)
GATED = ("layer", "head", "attn_neuron", "mlp", "mlp_neuron")  # attn and mlp_out implied
HOSTILE = "ioi</script><script>window.__pwned = 1</script><!--"


def make_run(run_dir, seed=0):
    """A finished run directory; returns (circuit, log_alpha)."""
    g = torch.Generator().manual_seed(seed)
    shapes = gate_shapes(DIMS)
    log_alpha = {k: torch.randn(shapes[k], generator=g) * 3 for k in GATED}
    log_alpha["layer"] = torch.full((3,), 4.0)
    log_alpha["mlp"] = torch.tensor([4.0, -4.0, 0.3])  # layer 1's MLP closed, layer 2's gate in between
    kept = {k: hard_concrete_reference(la, training=False) > 0.5 for k, la in log_alpha.items()}
    circuit = Circuit(kept, DIMS, 0.5, "llama")
    config = PruneConfig(granularities=GATED, steps=2)
    outputs.write_config(run_dir, config, {"task": HOSTILE, "data": "0", "n_train": 24, "n_eval": 8})
    metrics = {"kl": 0.125, "accuracy": 0.75, "full_accuracy": 1.0, "exact_match": 0.5, "logit_diff": math.nan,
               "full_logit_diff": 2.0, "n_examples": 8, "train/loss": 0.5, "train/objective": 0.25}
    curve = [{"tau": -9.0, "nodes_kept": 1.0, "kl": 0.0, "accuracy": 1.0},
             {"tau": 0.0, "nodes_kept": 0.5, "kl": 0.3, "accuracy": 0.625},
             {"tau": 2.0, "nodes_kept": 0.25, "kl": math.inf, "accuracy": 0.125}]
    history = [{"step": s, "loss": 1.0 / s, "objective": 0.5 / s, "sparsity/head": 0.1 * s, "sparsity/mean": 0.1 * s}
               for s in (1, 2)]
    outputs.write_results(run_dir, PruningResult(circuit, metrics, curve, history, log_alpha, config, run_dir))
    return circuit, log_alpha


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    circuit, log_alpha = make_run(run_dir)
    return run_dir, circuit, log_alpha


def embedded(path) -> dict:
    """The JSON the page carries in its data tag."""
    text = path.read_text(encoding="utf-8")
    found = re.findall(r'<script type="application/json" id="run-data">(.*?)</script>', text, re.S)
    assert len(found) == 1
    return json.loads(found[0])


def unpack(b64: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(base64.b64decode(b64), dtype=np.uint8))[:n].astype(bool))


# --------------------------------------------------------------------------------------------- the data
def test_a_run_writes_the_page_and_it_carries_the_circuit(run):
    run_dir, circuit, log_alpha = run
    data = embedded(run_dir / "circuit.html")  # written by write_results, at the end of the run
    assert data["counts"] == {g: {"kept": k, "total": n, "fraction": f} for g, (k, n, f) in circuit.counts().items()}
    assert data["gated"] == list(GATED) and data["threshold"] == 0.5 and data["dims"] == DIMS.to_dict()
    full = circuit.full()
    gate = {g: hard_concrete_reference(la, training=False) for g, la in log_alpha.items()}
    D = DIMS.head_dim
    assert len(data["layers"]) == DIMS.n_layers
    for i, layer in enumerate(data["layers"]):
        assert layer["layer"] == {"kept": bool(full["layer"][i]), "gate": pytest.approx(float(gate["layer"][i]))}
        assert layer["attn"] == {"kept": bool(full["attn"][i]), "gate": None}  # not gated
        for h, head in enumerate(layer["heads"]):
            assert head["kept"] == bool(full["head"][i, h])
            assert head["gate"] == pytest.approx(float(gate["head"][i, h]))
            (n,) = head["neurons"]
            cols = slice(h * D, (h + 1) * D)
            assert n["granularity"] == "attn_neuron" and n["total"] == D
            assert n["kept"] == int(full["attn_neuron"][i, cols].sum())
            assert torch.equal(unpack(n["bits"], D), full["attn_neuron"][i, cols])
            assert n["hist"] == torch.histc(gate["attn_neuron"][i, cols], bins=viewer.HIST_BINS, min=0, max=1).tolist()
        mlp = layer["mlp"]
        assert mlp["kept"] == bool(full["mlp"][i]) and mlp["gate"] == pytest.approx(float(gate["mlp"][i]))
        hidden, out = mlp["neurons"]
        assert (hidden["granularity"], out["granularity"]) == ("mlp_neuron", "mlp_out")
        assert hidden["kept"] == int(full["mlp_neuron"][i].sum()) and sum(hidden["hist"]) == DIMS.d_ff
        assert torch.equal(unpack(hidden["bits"], DIMS.d_ff), full["mlp_neuron"][i])
        assert out["kept"] == int(full["mlp_out"][i].sum()) and out["hist"] is None  # mlp_out not gated
    # the mixture the browser test relies on: kept and closed heads, a closed MLP, a closed-by-parent mlp_out
    assert 0 < circuit.counts()["head"][0] < DIMS.n_layers * DIMS.n_heads
    assert not data["layers"][1]["mlp"]["kept"] and data["layers"][1]["mlp"]["neurons"][1]["kept"] == 0
    assert data["metrics"]["logit_diff"] == "nan" and data["curve"][2]["kl"] == "inf"
    assert data["run"]["task"] == HOSTILE


def test_the_page_is_self_contained_and_its_data_cannot_end_the_script(run):
    text = (run[0] / "circuit.html").read_text(encoding="utf-8")
    assert text.count("<script") == 2 and text.count("</script>") == 2  # the data tag and the page's script
    assert "</script><script>window" not in text and "<!--" not in text
    assert re.findall(r"""(?:src|href)\s*=\s*(?!["']?data:)""", text) == []  # nothing loaded from elsewhere
    assert "@import" not in text and "url(" not in text
    assert "<title>circuit: ioi&lt;/script&gt;" in text


def test_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished pruning run"):
        viewer.write_html(tmp_path)
    make_run(tmp_path)
    (tmp_path / "gates.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no gates.safetensors"):
        viewer.write_html(tmp_path)
    outputs.save_gates(tmp_path / "gates.safetensors", {"head": torch.zeros(3, 5)}, DIMS)
    with pytest.raises(ValueError, match="gates for head but circuit.json gates layer, head"):
        viewer.write_html(tmp_path)
    outputs.save_gates(tmp_path / "gates.safetensors", {g: torch.zeros(3, 5) for g in GATED}, DIMS)
    with pytest.raises(ValueError, match=r"layer has shape \[3, 5\], the circuit's model needs \[3\]"):
        viewer.write_html(tmp_path)
    (tmp_path / "gates.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        viewer.write_html(tmp_path)


def test_a_page_that_cannot_be_written_warns_and_keeps_the_run(tmp_path, monkeypatch):
    def broken(run_dir):
        raise OSError("disk full")

    monkeypatch.setattr(viewer, "write_html", broken)
    with pytest.warns(UserWarning, match=r"could not write .*circuit.html \(OSError: disk full\).*--html"):
        circuit, _ = make_run(tmp_path)
    assert Circuit.from_json(tmp_path / "circuit.json") == circuit and not (tmp_path / "circuit.html").exists()


def test_show_html_writes_the_page_and_prints_its_path(tmp_path, capsys):
    make_run(tmp_path)
    (tmp_path / "circuit.html").unlink()
    assert main(["show", str(tmp_path)]) == 0
    assert not (tmp_path / "circuit.html").exists() and "viewer:" not in capsys.readouterr().out
    assert main(["show", str(tmp_path), "--html"]) == 0
    assert f"viewer: {tmp_path / 'circuit.html'}" in capsys.readouterr().out
    assert embedded(tmp_path / "circuit.html")["run"]["task"] == HOSTILE
    (tmp_path / "gates.safetensors").unlink()
    with pytest.raises(SystemExit):
        main(["show", str(tmp_path), "--html"])
    assert "no gates.safetensors" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- in a browser
@pytest.fixture(scope="module")
def browser():
    """One headless chromium session for the module; its console log is kept (goog:loggingPrefs)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the viewer's browser test needs selenium: pip install -e '.[test]'")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("the viewer's browser test needs Debian's chromium and its driver: apt-get install -y chromium "
                    "chromium-driver (.ci/run installs them)")
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def console_errors(driver) -> list:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_page_in_a_browser(run, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    run_dir, circuit, _ = run
    url = (run_dir / "circuit.html").as_uri()
    browser.get(url)
    assert console_errors(browser) == []
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0  # no network
    assert browser.execute_script("return window.__pwned") is None
    assert HOSTILE in browser.find_element(By.ID, "title").text

    # the counts shown are the circuit's
    for g, (k, n, _) in circuit.counts().items():
        row = browser.find_element(By.ID, f"count-{g}")
        shown = (row.find_element(By.CLASS_NAME, "kept").text, row.find_element(By.CLASS_NAME, "total").text)
        assert shown == (str(k), str(n)) and (row.get_attribute("data-kept"), row.get_attribute("data-total")) == shown
    full = circuit.full()
    for (layer, h), kept in np.ndenumerate(full["head"].numpy()):
        assert browser.find_element(By.ID, f"head-{layer}-{h}").get_attribute("data-kept") == str(int(kept))
    assert browser.find_element(By.ID, "metric-logit_diff").text.endswith("nan")

    # a click on a head, then on an MLP, shows that node's neuron-level kept counts
    D = DIMS.head_dim
    closed = [(int(i), int(h)) for i, h in (~full["head"]).nonzero()]
    for layer, h in [(int(i), int(h)) for i, h in full["head"].nonzero()][:1] + closed[:1]:
        browser.find_element(By.ID, f"head-{layer}-{h}").click()
        section = browser.find_element(By.CSS_SELECTOR, '#detail [data-granularity="attn_neuron"]')
        kept = int(full["attn_neuron"][layer, h * D:(h + 1) * D].sum())
        assert section.find_element(By.CLASS_NAME, "kept").text == str(kept)
        assert section.find_element(By.CLASS_NAME, "total").text == str(D)
        assert browser.find_element(By.ID, "detail-title").text == f"Layer {layer}, head {h}"
    for layer in range(DIMS.n_layers):
        browser.find_element(By.ID, f"mlp-{layer}").click()
        for g in ("mlp_neuron", "mlp_out"):
            section = browser.find_element(By.CSS_SELECTOR, f'#detail [data-granularity="{g}"]')
            assert section.find_element(By.CLASS_NAME, "kept").text == str(int(full[g][layer].sum()))
    assert browser.current_url.endswith(f"#node=mlp-{DIMS.n_layers - 1}")
    browser.find_element(By.ID, "head-0-0").send_keys(Keys.ENTER)  # the cells work from the keyboard too
    assert browser.find_element(By.ID, "detail").get_attribute("data-node") == "head-0-0"

    # a link to a node opens with it selected
    browser.get(url + "#node=head-2-1")
    browser.refresh()
    assert browser.find_element(By.ID, "detail").get_attribute("data-node") == "head-2-1"
    assert console_errors(browser) == []
