"""The prepared GPU check: every GPU path of the project measured and checked in one command.

``make gpu-check`` (``python bench/gpu_check.py --out gpu_check.json``) on a machine with CUDA GPUs,
within about 8 minutes on one GPU and without downloading anything:

1. ``data``: about 2,000 ILSVRC validation images at their real sizes (500x375 and the like; the
   project's ILSVRC fixture writer and converter; the synthetic generator at 448 px when the real
   geometry under ``shared/`` is absent), sharded into a temporary directory.
2. ``input``: img/s of DALI with nvJPEG (``mixed``), DALI on the CPU and the torch reader, training
   mode at 224 and 320 px, batch 128; and the GPU decode rate alone (reader + nvJPEG, no resize).
3. ``train``: ``deepspeed --num_gpus N launch/train.py``, ResNet-50 CSTN at 320 px for a fixed
   number of steps: fp32, bf16, fp16 (ZeRO 0) and bf16 with ZeRO 2; img/s from the trainer's
   progress line, peak memory from its summary. With one GPU, NCCL across GPUs is skipped.
4. ``head``: one training step (forward, backward, SGD step, bf16 autocast) of ResNet-50 at
   320 px, plain conv head and the CSTN head in each CUDA form (``im2col``, ``deform``,
   ``project``, ``reference``): the head ratio on the GPU and which form is fastest.
5. ``eval``: ``launch/evaluate.py`` img/s for CSTN and CAM on the set.
6. ``checks``: the CUDA head forms equal the reference form (forward and backward); one bf16
   training step gives finite losses; DALI GPU batches equal DALI CPU batches (labels, indices,
   boxes).

Every part has a time cap; what cannot run (no second GPU, no DALI, a part over its cap) is
reported with the reason, so a partial run still reports what it measured. The last line printed
is one JSON object (also written to ``--out``): every figure, each check's ``pass`` / ``fail`` /
``skip`` and the targets:

* ``dali_gpu_over_torch_320`` >= 3: DALI GPU img/s over the torch reader's (CPU) at 320 px;
* ``bf16_over_fp32`` >= 1.8: ResNet-50 CSTN training img/s, bf16 over fp32;
* ``cstn_over_conv_head`` <= 1.15: step time of the CSTN head (in its fastest CUDA form) over the
  plain conv head; ``fast_is_fastest`` says whether ``model.head_impl=fast`` picks that form.

Without CUDA it exits 2 at once with one line. ``--cpu-dry-run`` runs every part's code path on
the CPU with tiny inputs and a few steps (what CI runs, so the script cannot rot while no GPU is
at hand): DALI ``mixed`` and fp16 are skipped with their reason, the DALI comparison checks DALI
CPU against the torch reader, and the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


@dataclass
class Plan:
    """Sizes of one check: the full GPU one, or the CPU dry run."""

    images: int
    sizes: tuple
    batch: int
    train_steps: int
    train_size: int
    backbone: str
    width: float
    classes: int
    head_steps: int
    caps: dict
    device: str
    model: tuple = ()
    """Model overrides on top of the ILSVRC recipe (the dry run's inputs are too small for its 13/7 windows)."""
    split: str = "val"
    """The split the data step wrote (``val`` for the ILSVRC fixture, ``test`` for the synthetic fallback)."""

    @staticmethod
    def gpu() -> "Plan":
        return Plan(images=2000, sizes=(224, 320), batch=128, train_steps=30, train_size=320, backbone="resnet50",
                    width=1.0, classes=1000, head_steps=10, device="cuda",
                    caps={"data": 90, "input": 90, "train": 180, "head": 60, "eval": 60, "checks": 30})

    @staticmethod
    def dry_run() -> "Plan":
        return Plan(images=48, sizes=(64,), batch=8, train_steps=2, train_size=96, backbone="resnet10", width=0.25,
                    classes=1000, head_steps=2, device="cpu", model=("model.kernel_sizes=[3,3]", "model.paddings=[1,1]"),
                    caps={"data": 120, "input": 120, "train": 400, "head": 120, "eval": 300, "checks": 120})


class Report:
    """The JSON being built: parts of figures, checks, ratios against targets."""

    def __init__(self, plan: Plan, dry_run: bool):
        import torch

        self.data = {"dry_run": dry_run, "device": plan.device,
                     "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                     "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "torch": torch.__version__, "parts_seconds": {}, "checks": {}, "ratios": {}}

    def part(self, name: str, cap_s: float, fn, *args):
        """Run one part; its figures land under ``name``; an exception is reported, not raised."""
        start = time.time()
        try:
            self.data[name] = fn(*args, deadline=start + cap_s)
        except Exception as exc:  # a part that breaks must not hide the others' figures
            self.data[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        self.data["parts_seconds"][name] = round(time.time() - start, 1)
        print(f"gpu_check: {name} done in {self.data['parts_seconds'][name]:.0f}s: "
              f"{json.dumps(self.data[name])[:300]}", flush=True)
        return self.data[name]


def skipped(reason: str) -> dict:
    return {"skipped": reason}


# ---------------------------------------------------------------------------------------------
# 1. data
# ---------------------------------------------------------------------------------------------

def make_data(plan: Plan, work: Path, deadline: float) -> dict:
    """ILSVRC-sized images through the project's converter into ``work/shards/val``."""
    from pipeline.shards import ShardOptions, convert, list_source

    start = time.time()
    try:
        from pipeline.sources.ilsvrc_fixture import make_fixture

        raw = make_fixture(work / "ilsvrc", count=plan.images, texture="photo", xml=False, csv_file=True)
        source, dataset, split = "ilsvrc_fixture", "ilsvrc", "val"
    except Exception as exc:  # the real geometry lives in shared/, absent in some copies
        print(f"gpu_check: no ILSVRC geometry ({type(exc).__name__}: {exc}); synthetic 448 px images", flush=True)
        raw = work / "synthetic"
        subprocess.run([PY, "-m", "pipeline.sources.synthetic", "--out", str(raw), "--num-train", "0",
                        "--num-test", str(plan.images), "--image-size", "448", "--num-classes", str(plan.classes)],
                       cwd=ROOT, check=True, capture_output=True, timeout=max(10, deadline - time.time()))
        source, dataset, split = "synthetic_448", "cub", "test"
    convert(list_source(dataset, raw, split), work / "shards", ShardOptions(samples_per_shard=500, workers=2,
                                                                            progress=False))
    shutil.rmtree(raw)
    plan.split = split
    return {"images": plan.images, "source": source, "split": split, "seconds": round(time.time() - start, 1)}


def base_overrides(plan: Plan, work: Path, size: int) -> list[str]:
    return [f"data.root={work / 'shards'}", f"data.train_split={plan.split}", f"data.eval_split={plan.split}",
            f"data.image_size={size}",
            f"model.num_classes={plan.classes}", f"model.backbone={plan.backbone}", f"model.width={plan.width}",
            "log.mlflow=false", *plan.model]


def config(plan: Plan, work: Path, size: int, *extra: str, base: str = "configs/ilsvrc_cstn_r101.yaml"):
    from cstn.config import load_config

    return load_config(ROOT / base, [*base_overrides(plan, work, size), *extra])


# ---------------------------------------------------------------------------------------------
# 2. input pipeline
# ---------------------------------------------------------------------------------------------

def loader_rate(loader, images: int, deadline: float) -> float:
    """img/s after the first batch, until ``images`` more were delivered (or the deadline)."""
    it = iter(loader)
    next(it)
    seen, start = 0, time.time()
    for batch in it:
        seen += len(batch)
        if seen >= images or time.time() > deadline:
            break
    return round(seen / max(time.time() - start, 1e-9), 1)


def measure_input(plan: Plan, work: Path, deadline: float) -> dict:
    import torch

    from pipeline import loader as L

    out: dict = {}
    cuda = torch.cuda.is_available()
    try:
        from pipeline.dali import DaliLoader, DaliPlacement
    except Exception as exc:
        DaliLoader = None
        out["dali"] = skipped(f"nvidia.dali does not import: {exc}")
    budget = max(plan.batch * 4, 512 if cuda else 32)
    for size in plan.sizes:
        cfg = config(plan, work, size, f"data.batch_size={plan.batch}", "data.num_workers=4" if cuda else "data.num_workers=1")
        request = L.make_request(cfg, plan.split, 0, 1, train=True)
        if time.time() > deadline:
            out[f"torch_{size}"] = skipped("time cap")
            continue
        out[f"torch_{size}"] = loader_rate(L.backends()["torch"](request), budget, deadline)
        if DaliLoader is None:
            continue
        placements = [("dali_cpu", DaliPlacement("cpu", None))]
        placements.append(("dali_gpu", DaliPlacement("mixed", 0)) if cuda else ("dali_gpu", None))
        for name, placement in placements:
            if placement is None:
                out[f"{name}_{size}"] = skipped("no CUDA: nvJPEG needs a GPU")
            elif time.time() > deadline:
                out[f"{name}_{size}"] = skipped("time cap")
            else:
                out[f"{name}_{size}"] = loader_rate(DaliLoader(request, placement=placement), budget, deadline)
    out["decode_gpu"] = decode_rate(plan, work, deadline) if cuda and DaliLoader is not None else \
        skipped("no CUDA: nvJPEG needs a GPU")
    return out


def decode_rate(plan: Plan, work: Path, deadline: float) -> float:
    """GPU decode alone: DALI's webdataset reader and nvJPEG, full-size images, nothing else."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.manifest import read_split

    split = read_split(work / "shards", plan.split)

    @pipeline_def(batch_size=plan.batch, num_threads=4, device_id=0)
    def decode_only():
        jpegs = fn.readers.webdataset(paths=[str(s.tar) for s in split.shards], index_paths=[str(s.index) for s in split.shards],
                                      ext=["jpg"], random_shuffle=False, name="r")
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)

    pipe = decode_only()
    pipe.build()
    pipe.run()
    seen, start = 0, time.time()
    while seen < 1024 and time.time() < deadline:
        (images,) = pipe.run()
        seen += len(images)
    return round(seen / max(time.time() - start, 1e-9), 1)


# ---------------------------------------------------------------------------------------------
# 3. training through DeepSpeed
# ---------------------------------------------------------------------------------------------

def run_train(plan: Plan, work: Path, name: str, extra: list[str], timeout_s: float) -> dict:
    """One ``deepspeed launch/train.py`` run: img/s of its last progress line, peak memory of its summary."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    env = {**os.environ, "OMP_NUM_THREADS": "1" if plan.device == "cpu" else os.environ.get("OMP_NUM_THREADS", "4")}
    if plan.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [DEEPSPEED, "--num_gpus", str(gpus), "--master_port", str(free_port()), "launch/train.py",
           "--config", "configs/ilsvrc_cstn_r101.yaml", *base_overrides(plan, work, plan.train_size),
           f"train.out_dir={work / 'train' / name}", f"train.max_steps={plan.train_steps}", "train.epochs=100",
           "train.log_every_steps=1", "train.eval_every_epochs=0", "train.keep_last=1", "data.batch_size=32"
           if plan.device == "cuda" else "data.batch_size=4", *extra]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        return {"error": f"exit {res.returncode}: " + text[-600:]}
    rates = [float(m) for m in re.findall(r"([0-9.]+) img/s", text)]
    done = re.findall(r"done: (\{.*\})", text)
    summary = json.loads(done[-1]) if done else {}
    losses_finite = "non-finite loss" not in text
    return {"img_s": rates[-1] if rates else None, "peak_mem_gb": summary.get("peak_mem_gb"),
            "world_size": gpus, "losses_finite": losses_finite}


def measure_train(plan: Plan, work: Path, deadline: float) -> dict:
    import torch

    out: dict = {}
    cuda = plan.device == "cuda"
    runs = [("fp32", ["train.precision=fp32"]), ("bf16", ["train.precision=bf16"]),
            ("fp16", ["train.precision=fp16"]), ("bf16_zero2", ["train.precision=bf16", "train.zero_stage=2"])]
    for name, extra in runs:
        if not cuda and name in ("bf16", "fp16"):
            out[name] = skipped("CPU dry run: fp32 only (DeepSpeed on CPU trains in fp32)")
            continue
        if not cuda and name == "bf16_zero2":  # the ZeRO 2 path in fp32, the CPU's only precision
            extra = ["train.precision=fp32", "train.zero_stage=2"]
        left = deadline - time.time()
        if left < 20:
            out[name] = skipped("time cap")
            continue
        out[name] = run_train(plan, work, name, extra, timeout_s=left)
    if cuda and torch.cuda.device_count() < 2:
        out["nccl_multi_gpu"] = skipped("one GPU: NCCL across GPUs needs two")
    else:
        out["nccl_multi_gpu"] = {"world_size": out["fp32"].get("world_size")} if isinstance(out.get("fp32"), dict) \
            else skipped("fp32 run missing")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# 4. the head on the device, in process
# ---------------------------------------------------------------------------------------------

HEAD_FORMS = ("im2col", "deform", "project", "reference")


def measure_head(plan: Plan, work: Path, deadline: float) -> dict:
    """img/s of one training step (bf16 autocast on CUDA) per head: conv and every CSTN form."""
    import torch

    from cstn.losses import compute_loss
    from cstn.models import build_model
    from cstn.models.cstn_head import FAST_IMPL

    device = torch.device(plan.device)
    size, batch = plan.train_size, 32 if plan.device == "cuda" else 4
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, plan.classes, (batch,), device=device)
    out: dict = {}
    variants = [("conv", ["model.head=conv"])] + [(f"cstn_{form}", [f"model.head_impl={form}"]) for form in HEAD_FORMS]
    for name, extra in variants:
        if time.time() > deadline:
            out[name] = skipped("time cap")
            continue
        cfg = config(plan, work, size, *extra)
        torch.manual_seed(0)
        model = quiet(build_model, cfg).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        autocast = torch.autocast(plan.device, dtype=torch.bfloat16, enabled=plan.device == "cuda")

        def step():
            with autocast:
                loss = compute_loss(model(images), labels, cfg.loss)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()
        sync(device)
        start = time.time()
        for _ in range(plan.head_steps):
            step()
        sync(device)
        out[name] = round(plan.head_steps * batch / (time.time() - start), 1)
    forms = {f: out[f"cstn_{f}"] for f in HEAD_FORMS if isinstance(out.get(f"cstn_{f}"), float)}
    if forms and isinstance(out.get("conv"), float):
        fastest = max(forms, key=forms.get)
        out["fastest_form"] = fastest
        out["fast_is"] = FAST_IMPL
        out["cstn_over_conv_head"] = round(out["conv"] / forms[fastest], 3)   # step-time ratio
    return out


def quiet(fn, *args):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# 5. evaluation
# ---------------------------------------------------------------------------------------------

def measure_eval(plan: Plan, work: Path, deadline: float) -> dict:
    out: dict = {}
    env = {**os.environ}
    if plan.device == "cpu":
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    base = "configs/ilsvrc_cstn_r101.yaml"
    for name in ("cstn", "cam"):
        left = deadline - time.time()
        if left < 10:
            out[name] = skipped("time cap")
            continue
        extra = ["model.arch=cam"] if name == "cam" else []
        res = subprocess.run([PY, "launch/evaluate.py", "--config", base, *base_overrides(plan, work, plan.train_size),
                              *extra, "data.eval_batch_size=64" if plan.device == "cuda" else "data.eval_batch_size=8",
                              f"train.out_dir={work / 'eval' / name}", "--checkpoint", "init",
                              "--out", str(work / "eval" / name)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=left)
        if res.returncode != 0:
            out[name] = {"error": f"exit {res.returncode}: " + (res.stdout + res.stderr)[-600:]}
            continue
        metrics = json.loads((work / "eval" / name / "metrics.json").read_text())
        seconds = metrics["eval_time_data_s"] + metrics["eval_time_model_s"] + metrics["eval_time_metrics_s"]
        out[name] = round(metrics["eval_images_read"] / max(seconds, 1e-9), 1)
    return out


# ---------------------------------------------------------------------------------------------
# 6. correctness
# ---------------------------------------------------------------------------------------------

def run_checks(plan: Plan, work: Path, deadline: float) -> dict:
    return {"head_forms_match": check_head_forms(plan), "bf16_step_finite": check_bf16_step(plan, work),
            "dali_gpu_equals_cpu": check_dali(plan, work)}


def check_head_forms(plan: Plan) -> dict:
    """Every head form on the device against the reference form on the device: outputs and all
    gradients within float32 tolerance."""
    import torch

    from cstn.models.cstn_head import SAMPLERS
    from cstn.models.geometry import offset_basis, output_grid_size, theta_to_offsets

    device = torch.device(plan.device)
    g = torch.Generator().manual_seed(0)
    k, p = 3, 1
    features = torch.randn(2, 16, 12, 10, generator=g)
    out_h, out_w = output_grid_size(12, 10, k, p)
    residual = 0.3 * torch.randn(2, 6, out_h, out_w, generator=g)
    weight = torch.randn(8, 16, k, k, generator=g) * 0.1
    bias = torch.randn(8, generator=g)
    cotangent = torch.randn(2, 8, out_h, out_w, generator=g)
    basis = offset_basis(k).float()

    def run(form):
        inputs = [t.to(device).clone().requires_grad_() for t in (features, residual, weight, bias)]
        f, r, w, b = inputs
        y = SAMPLERS[form](f, theta_to_offsets(r, basis.to(device)), w, b, p)
        grads = torch.autograd.grad((y * cotangent.to(device)).sum(), inputs)
        return [y.detach().cpu(), *(gr.cpu() for gr in grads)]

    reference = run("reference")
    worst = {}
    for form in SAMPLERS:
        if form == "reference":
            continue
        try:
            got = run(form)
            worst[form] = max(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(got, reference))
        except Exception as exc:
            worst[form] = f"{type(exc).__name__}: {str(exc)[:200]}"
    ok = all(isinstance(v, float) and v < 1e-3 for v in worst.values())
    return {"result": "pass" if ok else "fail", "worst_relative_error": worst}


def check_bf16_step(plan: Plan, work: Path) -> dict:
    """One training step under bf16 autocast (CUDA, or the CPU's bf16 autocast in the dry run): every loss
    term finite and every gradient finite."""
    import torch

    from cstn.losses import compute_loss
    from cstn.models import build_model

    device = torch.device(plan.device)
    cfg = config(plan, work, plan.train_size)
    torch.manual_seed(0)
    model = quiet(build_model, cfg).to(device).train()
    images = torch.randint(0, 256, (4, 3, plan.train_size, plan.train_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, plan.classes, (4,), device=device)
    with torch.autocast(plan.device, dtype=torch.bfloat16):
        losses = compute_loss(model(images), labels, cfg.loss)
    losses["loss"].backward()
    finite = all(bool(torch.isfinite(v).all()) for v in losses.values()) and \
        all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return {"result": "pass" if finite else "fail", "losses": {k: float(v) for k, v in losses.items()}}


def check_dali(plan: Plan, work: Path) -> dict:
    """DALI GPU batches against DALI CPU batches (the dry run: DALI CPU against the torch reader), evaluation
    order: the same labels, indices and boxes batch by batch."""
    import torch

    from pipeline import loader as L

    try:
        from pipeline.dali import DaliLoader, DaliPlacement
    except Exception as exc:
        return {"result": "skip", "reason": f"nvidia.dali does not import: {exc}"}
    cfg = config(plan, work, plan.sizes[0], "data.eval_batch_size=32", "data.num_workers=1")
    request = L.make_request(cfg, plan.split, 0, 1, train=False)
    if torch.cuda.is_available():
        first, second, pair = DaliLoader(request, DaliPlacement("mixed", 0)), DaliLoader(request, DaliPlacement("cpu", None)), "dali_gpu/dali_cpu"
    else:
        first, second, pair = DaliLoader(request, DaliPlacement("cpu", None)), L.backends()["torch"](request), "dali_cpu/torch"
    compared = 0
    for a, b in zip(first, second):
        a, b = a.to("cpu"), b.to("cpu")
        same = (torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)
                and torch.equal(a.num_boxes, b.num_boxes) and torch.allclose(a.boxes, b.boxes))
        if not same:
            return {"result": "fail", "compared": pair, "batch": compared}
        compared += 1
        if compared >= 8:
            break
    return {"result": "pass" if compared else "fail", "compared": pair, "batches": compared}


# ---------------------------------------------------------------------------------------------

def ratios(report: dict) -> dict:
    """The three targets, each with its value (or why it is missing) and pass/fail."""
    def num(*path):
        node = report
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, (int, float)) else None

    def verdict(value, target, higher):
        if value is None:
            return {"value": None, "target": target, "result": "skip"}
        ok = value >= target if higher else value <= target
        return {"value": round(value, 3), "target": target, "result": "pass" if ok else "fail"}

    gpu, torch_rate = num("input", "dali_gpu_320"), num("input", "torch_320")
    bf16, fp32 = num("train", "bf16", "img_s"), num("train", "fp32", "img_s")
    head = num("head", "cstn_over_conv_head")
    out = {"dali_gpu_over_torch_320": verdict(gpu / torch_rate if gpu and torch_rate else None, 3.0, True),
           "bf16_over_fp32": verdict(bf16 / fp32 if bf16 and fp32 else None, 1.8, True),
           "cstn_over_conv_head": verdict(head, 1.15, False)}
    fastest = report.get("head", {}).get("fastest_form") if isinstance(report.get("head"), dict) else None
    out["fast_is_fastest"] = {"result": "skip" if fastest is None else
                              "pass" if report["head"]["fast_is"] == fastest else "fail",
                              "fastest": fastest, "fast": report.get("head", {}).get("fast_is")
                              if isinstance(report.get("head"), dict) else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the JSON report here")
    p.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU with tiny inputs (CI)")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "--cpu-dry-run to exercise its code path here", file=sys.stderr)
        return 2
    plan = Plan.dry_run() if args.cpu_dry_run else Plan.gpu()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(plan, args.cpu_dry_run)
    start = time.time()
    try:
        data = report.part("data", plan.caps["data"], make_data, plan, work)
        if "error" in data:
            print(json.dumps(report.data))
            return 1
        report.part("input", plan.caps["input"], measure_input, plan, work)
        report.part("train", plan.caps["train"], measure_train, plan, work)
        report.part("head", plan.caps["head"], measure_head, plan, work)
        report.part("eval", plan.caps["eval"], measure_eval, plan, work)
        checks = report.part("checks", plan.caps["checks"], run_checks, plan, work)
        report.data["checks"] = checks if "error" not in checks else {"error": checks["error"]}
        report.data["ratios"] = ratios(report.data)
        report.data["total_seconds"] = round(time.time() - start, 1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    line = json.dumps(report.data)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
