"""The benchmark's machinery (``benchmarks/``), quickly: the models' sizes, the child process
that measures one call, the peak meter, the warm-up, where reports go and the GPU suite's plan.
The benchmark itself runs by hand (``python benchmarks/bench.py --quick``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402
import gpu_suite  # noqa: E402
import memory  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402
import spectral  # noqa: E402
from harness import make_operator  # noqa: E402
from peaks import measured_peak  # noqa: E402

SIZES = {  # the parameter counts the README's table states
    "mlp": 269_322,
    "cnn": 9_930,
    "convnet": 172_250,
    "resnet20": 272_474,
    "gpt": 3_700_224,
    "resnet18": 11_173_962,
    "gpt30m": 29_545_472,
    "gpt124m": 124_046_592,
}
ON_LINUX = Path("/proc/self/status").exists()


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(set(SIZES) - set(models.GPT_SIZES)))
def test_model_sizes(name):
    assert models.build(name, scale="quick").size == SIZES[name]


@pytest.mark.parametrize("name", sorted(models.GPT_SIZES))
def test_gpt_sizes(name):
    with torch.device("meta"):  # no memory: the 124M model would take half a GiB
        assert parameters(models.GPT(**models.GPT_SIZES[name])) == SIZES[name]


def test_scales_set_the_data():
    assert models.build("resnet18", scale="tiny").layout == "2 × 2"
    assert models.build("convnet", scale="full").layout == "2 × 128"
    tiny = models.build("gpt124m", scale="tiny")
    assert tiny.size < 100_000 and "gpt124m" in tiny.name
    x, y = tiny.batches[0]
    assert y.shape == (x.numel(),)  # one target per token
    with pytest.raises(ValueError, match="scale"):
        models.build("mlp", scale="huge")


def test_problems_move_to_a_device_as_copies():
    problem = models.build("cnn", scale="quick")
    moved = problem.to(torch.float64, "cpu")
    assert moved.dtype == torch.float64 and problem.dtype == torch.float32
    assert moved.vectors(2, 0).dtype == torch.float64


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc")
def test_measured_peak_sees_an_allocation():
    with measured_peak("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert peak.above_mib >= 48
    assert peak.source.startswith("VmHWM")


def test_warm_up_stops_at_the_first_repeated_width():
    problem = models.build("convnet", scale="tiny")
    operator = make_operator(problem, "hessian")
    multiplied = []

    def call() -> None:
        for width in (1, 3, 1, 3, 3):
            operator.apply(problem.vectors(width, 0))
            multiplied.append(width)

    memory.warm_up(operator, call)
    assert multiplied == [1, 3]


def test_a_child_measures_one_call():
    spec = memory.Spec("convnet", "curvop", "apply", {"columns": 2}, scale="tiny")
    result = memory.run_child(spec, timeout=300)
    assert "error" not in result, result
    assert (result["columns"], result["calls"]) == (2, 1)
    assert result["peak_mib"] >= result["before_mib"] > 0
    assert result["seconds"] > 0 and result["gradient_seconds"] > 0


def test_a_child_reports_an_error_instead_of_failing():
    spec = memory.Spec("convnet", "curvop", "no_such_call", scale="tiny")
    assert "call must be one of" in memory.run_child(spec, timeout=300)["error"]


def test_reports_go_where_the_run_says():
    assert report.default_output(True, False, "cpu") == report.README
    assert report.default_output(True, True, "cpu").name == "README.quick.md"
    assert report.default_output(False, False, "cpu").name == "README.partial.md"
    assert report.default_output(True, False, "cuda").name == "README.cuda.md"
    assert bench.complete(bench.parser().parse_args([]))
    for partial in (["--quick"], ["--sections", "eigen"], ["--models", "mlp"], ["--no-peers"]):
        assert not bench.complete(bench.parser().parse_args(partial))


def test_the_readme_starts_with_its_template():
    text = report.render("## Results\n", ["### 1. a section\n"], "the end\n")
    assert text.startswith(report.TEMPLATE.read_text().rstrip())
    assert text.endswith("### 1. a section\nthe end\n")


def test_held_vectors():
    mib = spectral.held_vectors_mib(
        "spectral_density", {"num_probes": 4, "num_steps": 30}, 2**20, 4
    )
    assert mib == 4 * 30 * 4
    assert spectral.held_vectors_mib("top_eigenvalues", {"k": 5}, 2**20, 4) == 20 * 8
    assert spectral.held_vectors_mib("apply", {}, 2**20, 4) is None


def test_the_gpu_suite_plans_every_task():
    tasks = gpu_suite.plan("tiny", "cpu", 1)
    calls = {(task.spec.model, task.spec.library, task.spec.call) for task in tasks}
    assert ("gpt124m", "curvop", "eigsh") in calls
    assert ("resnet18", "curvlinops", "eigsh") in calls
    assert ("resnet18", "hessian-eigenthings", "spectral_density") in calls
    assert all(task.spec.call in memory.CALLS for task in tasks)
    assert {task.group for task in tasks} == set(gpu_suite.GROUPS)
    report_text = gpu_suite.render(tasks[:1], [{"error": "boom"}], "# heading\n")
    assert "fails: boom" in report_text
