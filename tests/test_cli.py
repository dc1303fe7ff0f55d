"""The ``curvop`` command: the main job, ``analyze`` on a user's file, and every error path."""

from __future__ import annotations

import io
import json
import re
import runpy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import curvop
from curvop import cli
from curvop.problems import load_problem

USER_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def problem():
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        x = torch.randn(22, 4, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (22,), generator=generator)
        return model, nn.CrossEntropyLoss(), [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]


    def one_batch():
        model, loss_fn, batches = problem()
        return model, loss_fn, (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))


    def loader():
        model, loss_fn, (x, y) = one_batch()
        dataset = torch.utils.data.TensorDataset(x, y)
        return model, loss_fn, torch.utils.data.DataLoader(dataset, batch_size=8)


    def swapped():
        model, loss_fn, data = problem()
        return loss_fn, model, data


    def swapped_functional_loss():
        model, _, data = problem()
        return nn.functional.cross_entropy, model, data


    def two_values():
        return nn.Linear(2, 2), nn.MSELoss()


    def not_a_model():
        return "model", nn.MSELoss(), (torch.zeros(2, 2), torch.zeros(2, 2))


    def loss_not_callable():
        return nn.Linear(2, 2), 3, (torch.zeros(2, 2), torch.zeros(2, 2))


    def fails():
        raise ValueError("no data here")


    def shapes_mismatch():
        return nn.Linear(5, 3), nn.MSELoss(), (torch.zeros(4, 4), torch.zeros(4, 3))


    class Reshuffled:
        def __iter__(self):
            order = torch.randperm(6)
            yield torch.randn(6, 2)[order], torch.randn(6, 1)


    def changing_data():
        return nn.Linear(2, 1), nn.MSELoss(), Reshuffled()


    class Broken(nn.Linear):
        def forward(self, x):
            raise RuntimeError("broken forward")


    def broken_model():
        return Broken(2, 1), nn.MSELoss(), (torch.zeros(3, 2), torch.zeros(3, 1))


    class Wrapped(nn.Module):
        def __init__(self, model, wrap):
            super().__init__()
            self.model, self.wrap = model, wrap

        def forward(self, x):
            return self.wrap(self.model(x))


    def dict_output():
        model, loss_fn, data = problem()
        return Wrapped(model, lambda logits: {"logits": logits, "aux": 2 * logits}), loss_fn, data


    def tuple_output():
        model, loss_fn, data = problem()
        return Wrapped(model, lambda logits: (logits, None)), loss_fn, data


    NOT_A_FUNCTION = 3
    """
)


# enough to exercise every phase, cheap enough for a fast test
SMALL_BUDGET = ["--density-probes", "2", "--density-steps", "5", "--trace-matvecs", "6"]


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_problem.py"
    path.write_text(USER_FILE)
    return path


@pytest.fixture
def outputs(tmp_path):
    """``--density`` and ``--json`` arguments into ``tmp_path``, and the two paths."""
    density, summary = tmp_path / "density.png", tmp_path / "summary.json"
    return ["--density", str(density), "--json", str(summary)], density, summary


def _user_problem(user_file):
    return runpy.run_path(str(user_file))["problem"]()


def _dense(user_file, kind: str) -> np.ndarray:
    return cli.build_operator(kind, *_user_problem(user_file)).to_dense()


def _table_row(out: str, label: str) -> list[str]:
    """The cells of the last row of the report's table that starts with ``label``."""
    rows = [line for line in out.splitlines() if line.startswith(label)]
    return rows[-1][len(label) :].split()


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_main_job_on_the_builtin_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    # the digits with scikit-learn, synthetic data of the same shape without
    assert out.splitlines()[0] == load_problem().describe()
    assert "2,410 parameters" in out
    assert "Hessian" in out and "GGN" in out and "trace (XTrace)" in out
    assert _is_png(tmp_path / "spectral_density.png")
    summary = json.loads((tmp_path / "curvop_summary.json").read_text())
    problem = summary["problem"]
    assert problem["num_params"] == 2410 and problem["num_samples"] == 1797
    assert problem["num_batches"] == 4 and problem["device"] == "cpu"
    for name in ("Hessian", "GGN"):
        report = summary["operators"][name]
        top = np.array(report["top_eigenvalues"])
        assert len(top) == 5 and np.all(np.diff(top) <= 0) and top[-1] > 0
        trace = report["trace"]
        assert 0 < trace["std_error"] < 0.1 * trace["value"]
        assert trace["value"] > top.sum()  # the trace also holds the rest of the spectrum
        assert report["products"]["density"] == 800
    hessian, ggn = summary["operators"]["Hessian"], summary["operators"]["GGN"]
    # near a minimum the Gauss-Newton matrix is close to the Hessian
    np.testing.assert_allclose(ggn["top_eigenvalues"], hessian["top_eigenvalues"], rtol=0.2)


@pytest.mark.parametrize(
    ("operator", "label", "exact", "rtol"),
    [
        ("hessian", "Hessian", "hessian", 1e-8),
        ("ggn", "GGN", "ggn", 1e-8),
        ("fd", "FD Hessian", "hessian", 1e-5),
    ],
)
def test_analyze_each_operator(user_file, outputs, capsys, operator, label, exact, rtol):
    options, density, summary_path = outputs
    spec = f"{user_file}:problem"
    argv = ["analyze", spec, "--operator", operator, "--k", "3", "--seed", "1", *options]
    code = cli.main([*argv, "--density-probes", "2", "--density-steps", "5"])  # full trace budget
    assert code == 0
    out = capsys.readouterr().out
    assert f"{spec}: 43 parameters, float64, 22 samples in 3 batches\n" in out
    assert label in out and ("GGN" in out) == (operator == "ggn")
    table = out[out.index("top-3 eigenvalues") : out.index("\n\nwrote")]
    _assert_aligned(table, [label])
    assert _is_png(density)
    summary = json.loads(summary_path.read_text())
    assert summary["seed"] == 1 and list(summary["operators"]) == [label]
    report = summary["operators"][label]
    matrix = _dense(user_file, exact)
    eigenvalues = np.linalg.eigvalsh(matrix)[::-1]
    np.testing.assert_allclose(report["top_eigenvalues"], eigenvalues[:3], rtol=rtol)
    trace = report["trace"]
    assert abs(trace["value"] - np.trace(matrix)) <= 5 * trace["std_error"] + 1e-6


@pytest.mark.parametrize(
    ("function", "batches"),
    [("problem", "3 batches"), ("one_batch", "1 batch"), ("loader", "3 batches")],
)
def test_analyze_header_counts_samples_and_batches(user_file, outputs, capsys, function, batches):
    options, _, summary_path = outputs
    spec = f"{user_file}:{function}"
    assert cli.main(["analyze", spec, "--k", "1", "--no-trace", "--no-density", *options]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == f"{spec}: 43 parameters, float64, 22 samples in {batches}"
    problem = json.loads(summary_path.read_text())["problem"]
    assert problem["description"] == header and problem["num_samples"] == 22
    assert problem["num_batches"] == int(batches.split()[0])


NUMBER = re.compile(r"-?\d\.\d{5}e[+-]\d\d")


def _assert_aligned(table: str, names: list[str]) -> None:
    """Every column's numbers, name and product count end at one position, and its +/- start
    at one position; numbers have six significant digits."""
    lines = table.splitlines()
    header, *body = lines
    ends = []
    for name in names:
        ends.append(header.index(f" {name}", ends[-1] if ends else 0) + 1 + len(name))
    numbers = [line for line in body if NUMBER.search(line)]
    assert numbers
    for line in numbers:
        assert [match.end() for match in NUMBER.finditer(line)] == ends, table
    errors = [line for line in body if "+/-" in line]
    for line in errors:
        assert [line.index("+/-", end) for end in ends] == [end + 1 for end in ends], table
    products = next(line for line in body if line.startswith("products"))
    assert [m.end() for m in re.finditer(r"[\d,]+", products)] == ends, table


def test_table_columns_are_aligned():
    def analysis(name, eigenvalues, trace, std_error):
        estimate = curvop.Estimate(trace, std_error, 6)
        products = {"eigenvalues": 123, "trace": 6}
        return cli.Analysis(name, np.array(eigenvalues), estimate, None, products, 12.345)

    analyses = [
        analysis("Hessian", [123456.7, 2.0, -0.5, 1e-9], 1.5e6, 0.0125),
        analysis("FD Hessian", [0.97, -3.25e-4, -12.0, -1e12], -7.0, 12345.0),
        analysis("H", [1.0, 1.0, 1.0, 1.0], 4.0, 0.0),
    ]
    table = cli.format_table(analyses, 4)
    _assert_aligned(table, ["Hessian", "FD Hessian", "H"])
    assert "1.23457e+05" in table and "-1.00000e+12" in table and "+/- 1.2e+04" in table
    assert all(line == line.rstrip() for line in table.splitlines())


def _run_fd(user_file, outputs, capsys) -> tuple[int, str, str]:
    options, _, _ = outputs
    argv = ["analyze", f"{user_file}:problem", "--operator", "fd", "--k", "1", "--no-density"]
    code = cli.main([*argv, "--trace-matvecs", "4", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_fd_note_before_the_table(user_file, outputs, capsys):
    code, out, _ = _run_fd(user_file, outputs, capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == cli.FD_NOTE and lines[2] == "" and lines[3].startswith("top-1 eigenvalues")
    assert "for models without double backward" in lines[1] and "kinks" in lines[1]
    for operator in ("hessian", "ggn"):
        argv = ["analyze", f"{user_file}:problem", "--operator", operator, "--k", "1"]
        assert cli.main([*argv, "--no-density", *outputs[0]]) == 0
        assert "note:" not in capsys.readouterr().out


def test_symmetry_is_checked_right_after_determinism(user_file, outputs, capsys, monkeypatch):
    operator_class = curvop.FiniteDifferenceHessianOperator
    calls = []

    def check_deterministic(self, **kwargs):
        calls.append("deterministic")
        return deterministic(self, **kwargs)

    def check_symmetric(self, *, rtol=None, seed=0):
        calls.append("symmetric")
        return 0.0

    deterministic = operator_class.check_deterministic
    monkeypatch.setattr(operator_class, "check_deterministic", check_deterministic)
    monkeypatch.setattr(operator_class, "check_symmetric", check_symmetric)
    code, out, _ = _run_fd(user_file, outputs, capsys)
    assert code == 0 and calls == ["deterministic", "symmetric"]


def test_an_asymmetric_operator_stops_before_the_eigensolver(
    user_file, outputs, capsys, monkeypatch
):
    def check_symmetric(self, *, rtol=None, seed=0):
        raise RuntimeError("the operator is not symmetric: relative gap 0.3 > rtol=1e-06")

    def no_eigensolver(*args, **kwargs):
        raise AssertionError("the eigensolver ran on an asymmetric operator")

    operator_class = curvop.FiniteDifferenceHessianOperator
    monkeypatch.setattr(operator_class, "check_symmetric", check_symmetric)
    monkeypatch.setattr(curvop, "top_eigenvalues", no_eigensolver)
    code, out, err = _run_fd(user_file, outputs, capsys)
    assert code == 2 and out == ""
    assert err == (
        "curvop: error: the FD Hessian of the problem cannot be computed: RuntimeError: the "
        "operator is not symmetric: relative gap 0.3 > rtol=1e-06\n"
    )


def test_options_before_and_after_the_command(user_file, outputs):
    options, _, summary_path = outputs
    spec = f"{user_file}:problem"
    assert cli.main(["--k", "2", "--seed", "7", "analyze", spec, *SMALL_BUDGET, *options]) == 0
    before = json.loads(summary_path.read_text())
    assert cli.main(["analyze", spec, "--k", "2", "--seed", "7", *SMALL_BUDGET, *options]) == 0
    after = json.loads(summary_path.read_text())
    assert len(before["operators"]["Hessian"]["top_eigenvalues"]) == 2 and before["seed"] == 7
    for result in (before, after):  # the time differs from run to run; the numbers do not,
        for report in result["operators"].values():  # beyond rounding: kernels are picked by
            report.pop("seconds")  # timing, and differ in the order of their sums
    assert_same_numbers(before, after)


def assert_same_numbers(a, b, rtol=1e-9):
    """Equal JSON, floats equal to ``rtol`` (float64 products, reproducible to rounding)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_numbers(a[key], b[key], rtol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_numbers(x, y, rtol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=1e-12)
    else:
        assert a == b


def test_without_matplotlib_the_plot_is_skipped(user_file, outputs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    options, density, summary_path = outputs
    assert cli.main(["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET, *options]) == 0
    out = capsys.readouterr().out
    assert "skipped the density plot: matplotlib is not installed" in out
    assert not density.exists() and summary_path.exists()


def test_cost_flags_cut_the_products_and_are_recorded(user_file, outputs, capsys):
    options, _, summary_path = outputs
    spec = f"{user_file}:problem"
    assert cli.main(["analyze", spec, "--k", "2", *options]) == 0
    default = json.loads(summary_path.read_text())
    assert cli.main(["analyze", spec, "--k", "2", *SMALL_BUDGET, *options]) == 0
    small = json.loads(summary_path.read_text())
    assert default["settings"] == {
        "k": 2,
        "tol": 0.0,
        "trace_matvecs": 60,
        "density_probes": 10,
        "density_steps": 80,
        "device": None,
        "output": None,
    }
    assert small["settings"] == {
        "k": 2,
        "tol": 0.0,
        "trace_matvecs": 6,
        "density_probes": 2,
        "density_steps": 5,
        "device": None,
        "output": None,
    }
    assert default["skipped"] == small["skipped"] == []
    report = small["operators"]["Hessian"]
    products = report["products"]
    assert products["trace"] == 6 and products["density"] == 2 * 5
    assert report["density"]["num_probes"] == 2 and report["density"]["num_steps"] == 5
    assert report["trace"]["num_matvecs"] == 6
    default_products = default["operators"]["Hessian"]["products"]
    assert default_products["trace"] > 6 and default_products["density"] > 10 * 5
    assert _table_row(capsys.readouterr().out, "products") == [f"{sum(products.values())}"]


def test_skipped_phases_are_left_out(user_file, outputs, capsys):
    options, density, summary_path = outputs
    argv = ["analyze", f"{user_file}:problem", "--k", "2", "--no-trace", "--no-density"]
    assert cli.main([*argv, *options]) == 0
    out = capsys.readouterr().out
    assert "trace" not in out and not density.exists() and f"wrote {density}" not in out
    summary = json.loads(summary_path.read_text())
    assert summary["skipped"] == ["trace", "density"]
    settings = summary["settings"]
    assert settings["trace_matvecs"] is None and settings["density_probes"] is None
    report = summary["operators"]["Hessian"]
    assert "trace" not in report and "density" not in report
    assert list(report["products"]) == ["eigenvalues"]
    assert _table_row(out, "products") == [str(report["products"]["eigenvalues"])]


def test_tol_goes_to_the_eigensolver(user_file, outputs, monkeypatch):
    options, _, summary_path = outputs
    argv = ["analyze", f"{user_file}:problem", "--k", "3", "--no-trace", "--no-density", *options]
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["tol"])
        return top_eigenvalues(*args, **kwargs)

    top_eigenvalues = curvop.top_eigenvalues
    monkeypatch.setattr(curvop, "top_eigenvalues", spy)
    products = {}
    for tol in ("0", "1e-2"):
        assert cli.main([*argv, "--tol", tol]) == 0
        summary = json.loads(summary_path.read_text())
        assert summary["settings"]["tol"] == float(tol)
        products[tol] = summary["operators"]["Hessian"]["products"]["eigenvalues"]
    assert calls == [0.0, 1e-2] and products["1e-2"] < products["0"]


def test_k_n_gives_the_whole_spectrum(user_file, outputs):
    options, _, summary_path = outputs
    argv = ["analyze", f"{user_file}:problem", "--k", "43", "--no-trace", "--no-density"]
    assert cli.main([*argv, *options]) == 0
    top = json.loads(summary_path.read_text())["operators"]["Hessian"]["top_eigenvalues"]
    eigenvalues = np.linalg.eigvalsh(_dense(user_file, "hessian"))[::-1]
    np.testing.assert_allclose(top, eigenvalues, rtol=1e-8, atol=1e-10 * eigenvalues[0])


@pytest.mark.parametrize(
    ("function", "key", "recorded"), [("dict_output", "logits", "logits"), ("tuple_output", "0", 0)]
)
def test_output_picks_the_tensor_the_loss_sees(user_file, outputs, function, key, recorded):
    options, _, summary_path = outputs
    cheap = ["--k", "2", "--no-trace", "--no-density", *options]
    assert cli.main(["analyze", f"{user_file}:problem", *cheap]) == 0
    plain = json.loads(summary_path.read_text())
    assert cli.main(["analyze", f"{user_file}:{function}", "--output", key, *cheap]) == 0
    picked = json.loads(summary_path.read_text())
    assert plain["settings"]["output"] is None and picked["settings"]["output"] == recorded
    np.testing.assert_allclose(
        picked["operators"]["Hessian"]["top_eigenvalues"],
        plain["operators"]["Hessian"]["top_eigenvalues"],
        rtol=1e-10,
    )


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"curvop {curvop.__version__}\n"


@pytest.mark.parametrize("command", ["main", "analyze"])
def test_device_moves_the_problem_first(user_file, outputs, monkeypatch, command):
    moved = []

    def spy(device, model, data):
        moved.append(device)
        return move_to(device, model, data)

    move_to = cli.move_to
    monkeypatch.setattr(cli, "move_to", spy)
    options, _, summary_path = outputs
    cheap = ["--k", "1", "--tol", "0.1", "--no-trace", "--no-density"]
    argv = ["analyze", f"{user_file}:problem"] if command == "analyze" else []
    assert cli.main([*argv, *cheap, *options]) == 0
    unmoved = json.loads(summary_path.read_text())
    assert cli.main([*argv, *cheap, "--device", "cpu", *options]) == 0
    summary = json.loads(summary_path.read_text())
    assert moved == [torch.device("cpu")]
    assert unmoved["settings"]["device"] is None and summary["settings"]["device"] == "cpu"
    assert unmoved["problem"]["device"] == summary["problem"]["device"] == "cpu"


def test_move_to_copies_batches_and_leaves_loaders(user_file):
    model, _, batches = _user_problem(user_file)
    device = torch.device("meta")  # a second device that every machine has
    moved_model, moved = cli.move_to(device, model, batches)
    assert moved_model is model and all(p.device == device for p in model.parameters())
    assert len(moved) == 3 and all(t.device == device for batch in moved for t in batch)
    x, y = batches[0]
    _, one = cli.move_to(device, model, ({"x": x}, y))
    assert one[0]["x"].device == device and one[1].device == device
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert cli.move_to(device, model, loader)[1] is loader
    assert x.device == torch.device("cpu")  # the user's tensors are copied, not moved


def test_density_without_suffix_gets_png_and_reports_it(user_file, tmp_path, capsys):
    density, summary_path = tmp_path / "out", tmp_path / "summary.json"
    argv = ["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET]
    argv += ["--json", str(summary_path)]
    assert cli.main([*argv, "--density", str(density)]) == 0
    out = capsys.readouterr().out
    assert _is_png(tmp_path / "out.png") and not density.exists()
    assert f"wrote {density}.png\n" in out and f"wrote {density}\n" not in out
    # the JSON summary is written first: a failing plot cannot lose it
    assert out.index(f"wrote {summary_path}") < out.index(f"wrote {density}.png")


def test_density_in_another_format(user_file, tmp_path, capsys):
    density = tmp_path / "density.pdf"
    argv = ["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET, "--density", str(density)]
    assert cli.main([*argv, "--json", str(tmp_path / "s.json")]) == 0
    assert density.read_bytes()[:5] == b"%PDF-"
    assert f"wrote {density}\n" in capsys.readouterr().out


def test_missing_output_directories_are_created(user_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the README's example, on a fresh checkout: no out/ yet
    options = ["--density", "out/density.pdf", "--json", "out/summary.json"]
    assert cli.main(["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET, *options]) == 0
    assert (tmp_path / "out/density.pdf").read_bytes()[:5] == b"%PDF-"
    assert json.loads((tmp_path / "out/summary.json").read_text())["settings"]["k"] == 1
    assert "wrote out/summary.json\nwrote out/density.pdf\n" in capsys.readouterr().out


def test_output_directories_are_not_created_when_the_run_fails(user_file, tmp_path, capsys):
    options = ["--density", str(tmp_path / "a/d.png"), "--json", str(tmp_path / "b/c/s.json")]
    assert cli.main(["analyze", f"{user_file}:fails", *options]) == 2
    assert "no data here" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_density_suffix_stops_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the problem was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_problem", no_work)
    summary_path = tmp_path / "summary.json"
    assert cli.main(["--density", str(tmp_path / "out.txt"), "--json", str(summary_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not summary_path.exists()
    assert captured.err.startswith("curvop: error: --density: matplotlib cannot write '.txt' files")
    assert ".png" in captured.err and ".pdf" in captured.err and len(captured.err.splitlines()) == 1


def test_a_failing_plot_keeps_the_summary(user_file, outputs, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    options, density, summary_path = outputs
    assert cli.main(["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET, *options]) == 2
    captured = capsys.readouterr()
    assert json.loads(summary_path.read_text())["operators"]["Hessian"]["top_eigenvalues"]
    assert f"wrote {summary_path}" in captured.out and not density.exists()
    assert captured.err == (
        f"curvop: error: --density: writing {density} failed: "
        "OSError: [Errno 28] No space left on device\n"
    )


def test_without_tqdm_no_progress_bar(user_file, outputs, monkeypatch, capsys):
    monkeypatch.setattr(cli, "tqdm", None)
    options, _, summary_path = outputs
    assert cli.main(["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET, *options]) == 0
    products = json.loads(summary_path.read_text())["operators"]["Hessian"]["products"]
    assert products["eigenvalues"] > 0 and products["trace"] > 0 and products["density"] > 0
    assert capsys.readouterr().err == ""


def test_progress_bars_on_a_terminal(user_file, outputs, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    options, _, _ = outputs
    assert cli.main(["analyze", f"{user_file}:problem", "--k", "1", *SMALL_BUDGET, *options]) == 0
    shown = terminal.getvalue()
    for phase in ("top-1 eigenvalues", "trace", "spectral density"):
        assert f"Hessian: {phase}:" in shown
    assert "products" in shown


def test_products_are_counted_in_the_block_only(user_file):
    operator = cli.build_operator("hessian", *_user_problem(user_file))

    def products() -> None:
        # counted by the library's one counter, not by a wrapper on the instance
        assert len(operator.product_observers) == 1 and "block_product" not in vars(operator)
        operator.apply(torch.ones(43, 3, dtype=torch.float64))  # three products
        operator @ np.ones(43)  # and one through SciPy

    result, count = cli._counted(operator, "test", None, lambda: products() or "done")
    assert (result, count) == ("done", 4)
    assert operator.product_observers == []  # counting stopped after the block
    operator @ np.ones(43)  # a product outside any block is counted nowhere
    assert cli._counted(operator, "test", None, lambda: operator @ np.ones(43))[1] == 1


BAD_ARGUMENTS = {
    "k zero": (["--k", "0"], "--k: must be a positive integer"),
    "k not a number": (["--k", "three"], "--k: must be a positive integer"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "no problem": (["analyze"], "required: FILE.py:FUNCTION"),
    "no colon": (["analyze", "{file}"], "expected FILE.py:FUNCTION"),
    "missing file": (["analyze", "{dir}/missing.py:problem"], "no such file"),
    "no such function": (["analyze", "{file}:nope"], "has no function 'nope' (functions:"),
    "not a function": (["analyze", "{file}:NOT_A_FUNCTION"], "is a int, not a function"),
    "wrong count": (["analyze", "{file}:two_values"], "must return (model, loss_fn, data), got 2"),
    "swapped": (
        ["analyze", "{file}:swapped"],
        "swapped() must return (model, loss_fn, data), but it looks like (loss_fn, model, data): "
        "the first value, a CrossEntropyLoss, has no parameters to differentiate and the second, "
        "a Sequential, has; swap them",
    ),
    "swapped functional loss": (
        ["analyze", "{file}:swapped_functional_loss"],
        "looks like (loss_fn, model, data): the first value, a function, has no parameters",
    ),
    "not a model": (["analyze", "{file}:not_a_model"], "model must be a torch.nn.Module"),
    "loss": (["analyze", "{file}:loss_not_callable"], "loss_fn must be callable"),
    "function raises": (["analyze", "{file}:fails"], "ValueError: no data here (my_problem.py"),
    "shape mismatch": (["analyze", "{file}:shapes_mismatch"], "cannot be computed: RuntimeError"),
    "changing data": (["analyze", "{file}:changing_data"], "the data changed between products"),
    "model raises": (["analyze", "{file}:broken_model"], "broken forward (my_problem.py, line"),
    "density probes": (["--density-probes", "0"], "--density-probes: must be a positive integer"),
    "density steps": (["analyze", "{file}:problem", "--density-steps", "x"], "--density-steps"),
    "trace matvecs": (["--trace-matvecs", "3"], "needs at least 4 products (two probes)"),
    "device unknown": (["--device", "gpu"], "--device: not a device: 'gpu' (e.g. cpu, cuda"),
    "device unavailable": (
        ["analyze", "{file}:problem", "--device", "cuda:99"],
        "--device: cuda:99 is not available here: ",
    ),
    "tol negative": (["--tol", "-1"], "--tol: must be a number >= 0"),
    "tol nan": (["analyze", "{file}:problem", "--tol", "nan"], "--tol: must be a number >= 0"),
    "k too large": (["analyze", "{file}:problem", "--k", "44"], "use --k 43 or less"),
    "bad operator": (["analyze", "{file}:problem", "--operator", "kfac"], "invalid choice"),
    "dict output without --output": (
        ["analyze", "{file}:dict_output"],
        "loss_fn was given the model's output (dict with keys ['logits', 'aux']) instead of a "
        'tensor, and raised; pass output="logits" to the operator to compute the loss from that '
        "tensor (curvop analyze: --output logits)",
    ),
    "output selects nothing": (
        ["analyze", "{file}:tuple_output", "--output", "logits"],
        "output='logits' does not select anything from the model's output, a tuple",
    ),
    "a file for a directory": (
        ["--json", "{file}/nowhere/s.json"],
        "--json: '{file}' is a file, not a directory, so '{file}/nowhere/s.json' cannot be written",
    ),
    "a directory": (["--json", "{dir}"], "is a directory; give a file name"),
    "a file for the plot's directory": (
        ["analyze", "{file}:problem", "--density", "{file}/d.png"],
        "--density: '{file}' is a file, not a directory",
    ),
    "a file for the plot's directory without suffix": (
        ["--density", "{file}/x/d"],
        "--density: '{file}' is a file, not a directory",
    ),
    "plot suffix": (["analyze", "{file}:problem", "--density", "d.json"], "cannot write '.json'"),
}


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_give_one_line_and_exit_code_2(user_file, capsys, argv, message):
    argv = [a.format(file=user_file, dir=user_file.parent) for a in argv]
    message = message.format(file=user_file)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvop"), captured.err
    assert message in lines[0] and "Traceback" not in captured.err


def test_python_dash_m(tmp_path):
    def run(*argv):
        command = [sys.executable, "-m", "curvop", *argv]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    done = run("analyze", "missing.py:problem")
    assert done.returncode == 2
    assert done.stderr == "curvop: error: no such file: 'missing.py'\n"
    shown = run("--help")
    assert shown.returncode == 0 and "analyze" in shown.stdout and "--k" in shown.stdout


def test_help_exits_zero(capsys):
    assert cli.main(["analyze", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "--operator {hessian,ggn,fd}" in shown and "--output KEY" in shown
