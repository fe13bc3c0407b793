# adstream: `make demo` runs the main job, `make test` runs the whole suite. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip --disable-pip-version-check

.PHONY: all install demo test test-fast bench drill clean

all: install

$(STAMP): requirements/base.txt requirements/constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -c requirements/constraints.txt -r requirements/base.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; its real deps are in base.txt
	$(PIP) install --no-deps -c requirements/constraints.txt torchrec
	$(PIP) install --no-deps -e .
	$(BIN)/python -c "import torch, fbgemm_gpu, torchrec, faust, feast, confluent_kafka, msgspec" 
	touch $(STAMP)

install: $(STAMP)

# system programs (Java, Maven, redis-server, ...): installed with apt-get as root, else one message
# with the exact command; then the broker's jars (cached under ~/.cache/adstream)
services-%:
	tools/ensure-services $*
	$(BIN)/adstream broker fetch

demo: install services-demo
	$(BIN)/adstream demo

# the fault drill (docs/drill.md): kill -9 of every worker, a broker restart, Redis stopped,
# malformed and poisoned input, then an audit of the topics and stores; exits 1 on any loss
drill: install services-test
	$(BIN)/adstream drill

# a test whose service is missing fails (tests/harness.py fail_service_missing), never skips
test: install services-test
	$(BIN)/python -m pytest -q --timeout=900 tests

# short versions of every speed benchmark, one table (ours vs a baseline measured in the same run);
# JSON in bench/results/bench.json. About 10-15 minutes on the 2-core development machine.
bench: install
	$(PIP) install -q -c requirements/constraints.txt -r requirements/bench.txt
	$(BIN)/adstream broker fetch
	PYTHONPATH=. $(BIN)/python bench/run_all.py

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf .adstream .pytest_cache bench/results
