# make demo | test | train | clean. Each target builds .venv, when it is missing, from requirements.txt
# and requirements-t2i.txt (diffusers and transformers, for text_to_image.py) at the versions in
# constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

# glibc hands large freed blocks back to the kernel and page-faults them in again on the next step;
# these keep them in the heap. Reported to halve large-batch CPU speed without them; our A/B runs
# were within noise (NOTES.md, CPU speed). They cost only memory that is not given back.
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000000

.PHONY: demo test train repro-cpu bench repro-gpu gpu-data gpu-check clean constraints

$(VENV)/.installed: requirements.txt requirements-t2i.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-t2i.txt -c constraints.txt
	touch $@

# constraints.txt: the versions of every package the tests passed with (pip freeze of a venv built
# from requirements*.txt alone). Versions, not builds: pip takes a CPU or a CUDA build of torch as
# the machine has it. `make constraints` resolves the newest versions anew; then run make test.
constraints:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -r requirements.txt -r requirements-t2i.txt
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/python -m pip freeze; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

# DDPM and Algorithm 1 (sigma_tn = 1) under its two loss weights on 16 bundled CIFAR-10 images at 8x8
# (tiny preset, CPU), each scored after 32k and, resumed, after 96k images seen: how far each method
# delays copying (NOTES.md, "Onset"). Everything else is ambient.py's default, the released method.
DEMO := --data demo --n 16 --preset tiny --resolution 8 --batch 64 --lr 1e-3 \
        --samples 256 --device cpu --seed 0 --log-every 500
DEMO_RUNS := $(foreach m,ddpm released x0,runs/demo-$(m)-32k runs/demo-$(m)-96k)
demo: $(VENV)/.installed
	rm -rf runs/demo-*
	for m in ddpm released x0; do \
	  if [ $$m = ddpm ]; then flags="--sigma-tn 0"; else flags="--sigma-tn 1 --ambient-weight $$m"; fi; \
	  $(PY) ambient.py $(DEMO) $$flags --iters 500 --out runs/demo-$$m-32k || exit 1; \
	  cp -r runs/demo-$$m-32k runs/demo-$$m-96k; \
	  $(PY) ambient.py $(DEMO) $$flags --iters 1500 --resume --out runs/demo-$$m-96k || exit 1; \
	done
	$(PY) eval_memorization.py $(DEMO_RUNS) --pixels-only --out runs/demo-eval
	@echo "grids: runs/demo-*/neighbours.png (sample, then its nearest training image)"
	@echo "At every length measured (8k to 1M images, NOTES.md 'Onset') the x0 weight copies no more than"
	@echo "DDPM and the released weight, and more the longer it trains: it delays copying, it does not prevent it"

test: $(VENV)/.installed
	$(PY) -m pytest -q test_*.py

# The paper's CIFAR-10 setting (Table 1, n = 300): a GPU job.
train: $(VENV)/.installed
	$(PY) ambient.py --data cifar --n 300 --sigma-tn 0.4

clean:
	rm -rf runs __pycache__ .pytest_cache

# NOTES.md's CPU results: the demo, the sigma_tn sweep (Figure 2's shape), Figure 3 and Table 2; ~25 min.
repro-cpu: $(VENV)/.installed
	$(PY) repro_cpu.py demo
	$(PY) repro_cpu.py sweep
	$(PY) repro_cpu.py fig3
	$(PY) repro_cpu.py table2

# Copy rate and quality against images seen (NOTES.md, "Onset"): DDPM and Algorithm 1 under both
# weights, trained once per setting and scored at log-spaced checkpoints; resumable (finished
# checkpoints are reused). Wall time: NOTES.md. With ../shared/judge present it adds fd_judge.
.PHONY: onset
onset: $(VENV)/.installed
	$(PY) repro_cpu.py onset $(if $(wildcard ../shared/judge/judge.py),--judge ../shared/judge)

# Throughput table (training and sampling images/s, FLOPs, MFU): tiny on CPU; on a GPU each row of
# the small preset (eager, --graph, + --compile, + bf16, + channels_last), edm and Heun-40 sampling.
bench: $(VENV)/.installed
	$(PY) bench.py

# Table 1's CIFAR-10 trio (n = 300: DDPM, released, x0) stepped together to the paper's budget, as
# curves against images seen, sampled and judged at each checkpoint: a GPU job. BUDGET=480 scales the
# images seen to fit about that many seconds; RESUME=1 continues (or extends) the trio in runs/table1.
# It reads gpu-data/ (make gpu-data).
repro-gpu: $(VENV)/.installed
	$(PY) repro_gpu.py table1 $(if $(BUDGET),--budget-s $(BUDGET)) $(if $(RESUME),--resume) $(GPU_TABLE1)

# The GPU machine has no ../shared and no internet: the CIFAR-10 subsets and the offline judge are
# copied into gpu-data/ (git-ignored), which a device call carries. Run here, where ../shared is.
GPU_DATA := gpu-data
GPU_TABLE1 := --data $(GPU_DATA)/data/cifar10_train_png4000.npz --judge $(GPU_DATA)/judge
gpu-data:
	rm -rf $(GPU_DATA)
	mkdir -p $(GPU_DATA)/data $(GPU_DATA)/judge
	cp ../shared/data/cifar10_train_png4000.npz ../shared/data/cifar10_test_png1000.npz $(GPU_DATA)/data/
	cp ../shared/judge/judge.py ../shared/judge/cifar10_judge.pt ../shared/judge/README.md $(GPU_DATA)/judge/
	# gpu_check.sh t2i: the GPU image has transformers and huggingface-hub but not diffusers
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d $(GPU_DATA)/whl \
	    diffusers==0.42.1 importlib_metadata==10.2.0

# The one-call GPU check (within one 600 s call on an H200; NOTES.md's GPU section): gpu_check.sh,
# which runs without make too: the trio's CUDA tests, the trio, then the bench rows with what is
# left. MODE=resume: a second call continues the trio toward 7.68M images; MODE=t2i: SD-2's training
# step's peak memory and img/s. RESULTS=DIR receives the logs and reports.
gpu-check:
	PYTHON=$(PYTHON) bash gpu_check.sh $(or $(RESULTS),runs/gpu-check) $(MODE)
