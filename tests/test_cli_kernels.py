"""chargpt.train with a kernels backend and a dtype that do not go together: one line at start, never a traceback
mid-step; --fused runs eager only the ops no fused kernel takes, and says so."""

import json

import pytest

from chargpt_kernels import backends

from chargpt_helpers import assert_one_line_error, small_text, train

TINY = ("--preset", "tiny", "--device", "cpu", "--max-iters", "2", "--eval-iters", "1")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(small_text(), encoding="utf-8")
    return path


def require(name):
    reason = backends.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")


def test_ext_with_float16_on_cpu_stops_at_start(tmp_path, text_file):
    require("ext")  # its CPU attention takes float32 and bfloat16 only
    result = train(*TINY, "--kernels", "ext", "--dtype", "float16", "--data", text_file, "--out-dir", tmp_path / "out")
    assert_one_line_error(result, "chargpt.train", "--kernels ext cannot run this model's attention, which gets "
                                                   "float16 tensors on cpu")
    assert "--dtype float32" in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_triton_on_cpu_without_the_interpreter_stops_at_start(tmp_path, text_file):
    result = train(*TINY, "--kernels", "triton", "--data", text_file, "--out-dir", tmp_path / "out",
                   env={"TRITON_INTERPRET": "0"})
    assert_one_line_error(result, "chargpt.train", "chargpt_kernels backend 'triton' is unavailable")
    assert not (tmp_path / "out").exists()


def test_interpreted_triton_with_bfloat16_stops_at_start(tmp_path, text_file):
    result = train(*TINY, "--kernels", "triton", "--dtype", "bfloat16", "--data", text_file,
                   "--out-dir", tmp_path / "out", env={"TRITON_INTERPRET": "1"})
    if "triton is not installed" in result.stderr:
        pytest.skip("triton is not installed")
    assert_one_line_error(result, "chargpt.train", "--kernels triton cannot run this model's attention, which gets "
                                                   "bfloat16 tensors on cpu")


def test_fused_float16_on_cpu_runs_attention_eager_and_says_so(tmp_path, text_file):
    require("ext")
    result = train(*TINY, "--fused", "--dtype", "float16", "--data", text_file, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    note = [line for line in result.stdout.splitlines() if line.startswith("kernels auto:")]
    assert note == ["kernels auto: attention runs eager (no fused kernel here takes float16 on cpu yet), "
                    "layer_norm runs ext, add_norm runs ext"]
    assert "kernels auto (attention eager, layer_norm ext, add_norm ext)" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kernels"] == "auto" and summary["dtype"] == "float16" and summary["iters"] == 2
    assert summary["kernels_by_op"] == {"attention": "eager", "layer_norm": "ext", "add_norm": "ext"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_on_cpu_runs_every_op_fused(tmp_path, text_file, dtype):
    require("ext")
    result = train(*TINY, "--fused", "--dtype", dtype, "--data", text_file, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels auto:" not in result.stdout and "kernels ext," in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kernels"] == "ext" and summary["dtype"] == dtype
    assert summary["kernels_by_op"] == {"attention": "ext", "layer_norm": "ext", "add_norm": "ext"}
