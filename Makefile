# The two commands of the README: `make demo` and `make test`.
# Both create .venv when missing and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# One BLAS/OpenMP thread per process: DeepSpeed ranks and loader workers share 2 cores.
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: demo compare sweep test install bench eval-scale gpu-check clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) launch/demo.py

# The paper's comparison methods (HaS, ACoL, SPG, ADL, CutMix) beside CSTN and CAM, 3 seeds (about
# 25 min per seed on 2 cores; runs already finished are reused), then mean and spread.
SEEDS ?= 0 1 2
compare: $(STAMP)
	for s in $(SEEDS); do $(PY) launch/demo.py --seed $$s --out runs/demo_seed$$s --methods all || exit 1; done
	$(PY) launch/compare.py $(foreach s,$(SEEDS),runs/demo_seed$(s))

# The paper's ablations (head, levels, lambda) and the probes over 3 seeds on the demo's data (about
# 70 min on 2 cores; the data is generated under runs/demo_seed0 when missing).
sweep: $(STAMP)
	$(PY) launch/sweep.py --sweep all --seeds $(SEEDS) --data runs/demo_seed0 --out runs/sweep

eval-scale: $(STAMP)
	$(PY) bench/eval_scale.py

bench: $(STAMP)
	for b in $(filter-out bench/eval_scale.py bench/gpu_check.py,$(wildcard bench/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

# Every GPU path measured and checked in one command (about 8 min on one GPU; exits 2 without CUDA).
GPU_CHECK_OUT ?= gpu_check.json
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs data .pytest_cache
