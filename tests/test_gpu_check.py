"""bench/gpu_check.py: its CPU twin runs every part's code path (CI has no GPU), and the report has every key."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_says_so_in_one_line():
    res = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "no CUDA device" in res.stderr


def test_cpu_dry_run_reports_every_part(tmp_path):
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == report           # the last line is the report
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert set(report["parts_seconds"]) == {"data", "input", "train", "head", "eval", "checks"}
    # input: the CPU readers measured, the GPU ones skipped with their reason
    assert report["input"]["torch_64"] > 0 and report["input"]["dali_cpu_64"] > 0
    assert "nvJPEG" in report["input"]["dali_gpu_64"]["skipped"] and "skipped" in report["input"]["decode_gpu"]
    # training through DeepSpeed: fp32 and the ZeRO 2 path (the SGD recipe) ran; bf16/fp16 say why not
    assert report["train"]["fp32"]["img_s"] > 0 and report["train"]["fp32"]["losses_finite"]
    assert report["train"]["bf16_zero2"]["img_s"] > 0
    assert "fp32 only" in report["train"]["bf16"]["skipped"] and "fp32 only" in report["train"]["fp16"]["skipped"]
    # every head form took steps; the fastest is named, and whether `fast` picks it
    for name in ("conv", "cstn_im2col", "cstn_deform", "cstn_project", "cstn_reference"):
        assert report["head"][name] > 0, name
    assert report["head"]["fastest_form"] in ("im2col", "deform", "project", "reference")
    assert report["eval"]["cstn"] > 0 and report["eval"]["cam"] > 0
    assert {k: v["result"] for k, v in report["checks"].items()} == {
        "head_forms_match": "pass", "bf16_step_finite": "pass", "dali_gpu_equals_cpu": "pass"}
    assert report["checks"]["dali_gpu_equals_cpu"]["compared"] == "dali_cpu/torch"
    ratios = report["ratios"]
    assert set(ratios) == {"dali_gpu_over_torch_320", "bf16_over_fp32", "cstn_over_conv_head", "fast_is_fastest"}
    assert ratios["dali_gpu_over_torch_320"]["result"] == "skip" and ratios["bf16_over_fp32"]["result"] == "skip"
    assert ratios["cstn_over_conv_head"]["result"] in ("pass", "fail") and ratios["cstn_over_conv_head"]["target"] == 1.15
