# make demo | test | train | clean. Each target builds .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

# glibc hands large freed blocks back to the kernel and page-faults them in again on the next step;
# these keep them in the heap. Reported to halve large-batch CPU speed without them; our A/B runs
# were within noise (NOTES.md, CPU speed). They cost only memory that is not given back.
export MALLOC_MMAP_THRESHOLD_ ?= 1000000000000
export MALLOC_TRIM_THRESHOLD_ ?= 1000000000000

.PHONY: demo test train repro-cpu bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# DDPM and Algorithm 1 side by side on the bundled CIFAR-10 subset, tiny preset, CPU, about 4.5 min.
# The setting (16 images at 8x8, 64k images seen) is the one NOTES.md's CPU results use.
DEMO := --data demo --n 16 --preset tiny --resolution 8 --schedule edm --iters 1000 --batch 64 --lr 1e-3 \
        --samples 256 --steps 32 --device cpu --seed 0 --log-every 250
demo: $(VENV)/.installed
	rm -rf runs/demo-ddpm runs/demo-ambient-1
	$(PY) ambient.py $(DEMO) --sigma-tn 0 --out runs/demo-ddpm
	$(PY) ambient.py $(DEMO) --sigma-tn 1 --out runs/demo-ambient-1
	$(PY) ambient.py --compare runs/demo-ddpm runs/demo-ambient-1
	@echo "grids: runs/demo-ddpm/neighbours.png runs/demo-ambient-1/neighbours.png (sample, then its nearest training image)"

test: $(VENV)/.installed
	$(PY) -m pytest -q test_ambient.py test_eval_memorization.py

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

# Throughput table (training and sampling images/s, FLOPs, MFU): tiny on CPU, paper on the GPU.
bench: $(VENV)/.installed
	$(PY) bench.py
