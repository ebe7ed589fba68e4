# The whole path: demo data -> train -> export -> archive -> serve -> register -> predict.
# Each step is its own target; `make demo` runs them all, `make test` runs the tests.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/demo
RUNS   ?= runs
EXPORT ?= export
STORE  ?= model_store
RUN    := run

# Training from random weights: no pretrained weights can be downloaded on every
# machine. On an online machine, WEIGHTS=DEFAULT uses torchvision's ImageNet weights.
# Each model starts from its recipe (training/fit/recipes/); the demo shortens it for
# the small demo data. On real data: DOG_TRAIN_ARGS= FLY_TRAIN_ARGS= WEIGHTS=DEFAULT.
WEIGHTS ?= none
DOG_TRAIN_ARGS ?= --epochs 4 --batch-size 16 --optimizer adam --lr 0.001
# A frozen *random* MobileNetV2 backbone carries no class information (measured), so
# the demo trains all 19 feature blocks from the start; with ImageNet weights, drop
# these flags and the recipe's staged fine-tuning applies.
FLY_TRAIN_ARGS ?= --epochs 5 --batch-size 16 --head-epochs 0 --unfreeze-blocks 19
# Serving settings written into each archive's model-config.yaml (handlers/settings.py
# documents each and holds the defaults): a worker per core (one torch thread each),
# at most 4, since every worker holds its own copies of the model.
EXPORT_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
EXPORT_ARGS ?= --workers $(EXPORT_WORKERS)
# QUANTIZE=int8: int8 models for x86 CPUs (training/export/quantize.py), a faster forward pass
# (`make archive QUANTIZE=int8`; plain `make archive` goes back to fp32),
# calibrated on $(DATA)/train; the export stops, writing nothing, if test accuracy drops
# by more than 1 point. Off by default: fp32 answers exactly what evaluation measured.
QUANTIZE ?=
# PRECISION: the served models' number format on CPU workers (handlers/precision.py):
# auto (bf16 where the CPU has bf16 units, else fp32), fp32 or bf16. auto and bf16 add a
# bf16 copy to each model.pt, gated for accuracy at export (docs/export.md).
PRECISION ?= auto

# glibc returns freed memory to the OS too eagerly for PyTorch's allocation pattern of
# large short-lived tensors (page faults on every batch); docs/performance.md says how much
# raising these thresholds gains.
export MALLOC_MMAP_THRESHOLD_ ?= 17179869184
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184

# How TorchServe is started: from run/, with its PID file in run/tmp, so the key
# file, logs and PID file of this checkout's server stay in run/. It reads
# run/config.properties: config.properties with its relative paths made absolute.
TS_ENV := cd $(RUN) && env -u PYTHONPATH TMPDIR=$(CURDIR)/$(RUN)/tmp
CLIENT := $(PY) -m serving.client --key-file $(RUN)/key_file.json

# imagenet_dogs needs no training: EfficientNet-Lite0's ImageNet classifier, its 118 dog
# breeds as answers (training/export/pretrained.py). The other two train on DATA.
TRAINED := dog_breeds flying_objects
MODELS := imagenet_dogs $(TRAINED)
DOG_MODELS := imagenet_dogs dog_breeds
MARS   := $(MODELS:%=$(STORE)/%.mar)

.PHONY: FORCE help venv check-java data check-data train export archive serve register predict stop soak rollout rollback retire grpc kserve ui browser demo demo-answers explain test test-fast lint bench bench-int8 bench-flops bench-explain bench-deps test-deps bench-train clean

help:
	@echo "make demo      install, generate demo data, train, export, archive, serve, register, predict"
	@echo "make test      run the test suite (installs first);  make test-fast  the tests that start no server or browser"
	@echo "make lint      ruff (lint and format check) and mypy of handlers/"
	@echo "steps:         venv data train export archive serve register predict stop"
	@echo "make check-data  data problems and class counts (training.data.clean, training.data.stats; DATA=...)"
	@echo "make bench-train training throughput table;  make bench   serving benchmark (bench-int8: on int8 exports; bench-flops: forward pass vs matmul)"
	@echo "make bench-explain  do the explanations' maps point at the dog, and what they cost (needs ../shared/photos)"
	@echo "make soak      60 s of load at concurrency 32 against the running server (SOAK_MODEL=...)"
	@echo "make rollout|rollback|retire MODEL=name VERSION=x   model versions through the management API"
	@echo "make grpc      generate the gRPC client's stubs;  make kserve   KServe layout + manifests"
	@echo "make ui        the upload page on http://127.0.0.1:5000 (with make serve running)"
	@echo "make predict IMG=path/to/image.jpg MODEL=dog_breeds"
	@echo "make explain IMG=path/to/image.jpg MODEL=imagenet_dogs   the answer's map (picture in run/explanations/)"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "Python 3.10+ is needed (found $$($(PYTHON) --version)); set PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	@echo "Installing pinned dependencies (torch is large: a few minutes)..."
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	touch $@

check-java:
	@j="$${JAVA_HOME:+$$JAVA_HOME/bin/}java"; \
	v=$$("$$j" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	if [ -z "$$v" ] || [ "$$v" -lt 17 ]; then \
	  echo "TorchServe needs Java 17 or newer; found: $${v:-no java}." >&2; \
	  echo "Install it (Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless) or point JAVA_HOME at one." >&2; \
	  exit 1; fi

data: $(DATA)/.done
$(DATA)/.done: training/demo/shapes.py | venv
	rm -rf $(DATA)
	$(PY) -m training.demo.shapes --out $(DATA)
	touch $@

# metrics.json is written when a run ends. An interrupted run continues with
# make train RESUME=1 (from its last.pt); RESUME=0 starts it over.
RESUME_ARG = $(if $(filter 1,$(RESUME)),--resume,$(if $(filter 0,$(RESUME)),--restart))
train: $(TRAINED:%=$(RUNS)/%/metrics.json)
$(RUNS)/imagenet_dogs/metrics.json: training/export/pretrained.py | venv
	$(PY) -m training.export.pretrained --model imagenet_dogs --out $(RUNS)/imagenet_dogs
$(RUNS)/dog_breeds/metrics.json: $(DATA)/.done
	$(PY) -m training.fit.train --recipe dog_breeds $(DOG_TRAIN_ARGS) --weights $(WEIGHTS) --data $(DATA) --out $(RUNS)/dog_breeds --workers 1 $(RESUME_ARG)
$(RUNS)/flying_objects/metrics.json: $(DATA)/.done
	$(PY) -m training.fit.train --recipe flying_objects $(FLY_TRAIN_ARGS) --weights $(WEIGHTS) --data $(DATA) --out $(RUNS)/flying_objects --workers 1 $(RESUME_ARG)

# The data tools on a dataset: problems (not images, corrupt, tiny, duplicates,
# label conflicts) and class counts, with a chart beside the dataset folder.
check-data: | venv
	$(PY) -m training.data.clean --data $(DATA) || test $$? = 3
	$(PY) -m training.data.stats --data $(DATA)

export: $(MODELS:%=$(EXPORT)/%/model.pt)
# The settings of the last export, rewritten only when they change, so that
# `make archive QUANTIZE=int8` (and back without it) re-exports instead of
# keeping the previous files.
EXPORT_SETTINGS = $(EXPORT)/.settings
EXPORT_SETTINGS_LINE = $(EXPORT_ARGS) quantize=$(QUANTIZE) precision=$(PRECISION)
$(EXPORT_SETTINGS): FORCE
	@mkdir -p $(EXPORT)
	@echo '$(EXPORT_SETTINGS_LINE)' | cmp -s - $@ || echo '$(EXPORT_SETTINGS_LINE)' > $@
FORCE:
$(EXPORT)/%/model.pt: $(RUNS)/%/metrics.json $(wildcard training/export/*.py) $(EXPORT_SETTINGS)
	$(PY) -m training.export --checkpoint $(RUNS)/$*/best.pt --out $(EXPORT)/$* $(EXPORT_ARGS) \
	  --precision $(PRECISION) $(if $(filter $(DOG_MODELS),$*),--handler dog_breeds) \
	  $(if $(filter $(TRAINED),$*),--data $(DATA)) \
	  $(if $(and $(QUANTIZE),$(filter $(TRAINED),$*)),--quantize $(QUANTIZE))

archive: $(MARS)
# Rebuilt when the runtime they ship (handlers/, whole) changes.
$(STORE)/%.mar: $(EXPORT)/%/model.pt $(wildcard handlers/*.py)
	$(PY) -m serving.archive --exports $(EXPORT) --model-store $(STORE) --only $*

# config.properties loads every archive of the model store at start (load_models=all),
# so the archives are checked against SHA256SUMS first.
serve: check-java | venv
	@mkdir -p $(RUN)/tmp $(STORE)
	@if $(CLIENT) wait --for 1 >/dev/null 2>&1; then echo "TorchServe is already running"; else \
	  $(PY) -m serving.archive --verify --model-store $(STORE) && \
	  $(PY) -m serving.server --out $(RUN)/config.properties && \
	  ($(TS_ENV) $(CURDIR)/$(VENV)/bin/torchserve --start --ncs --ts-config config.properties \
	    --log-config $(CURDIR)/serving/log4j2.xml --model-store $(CURDIR)/$(STORE) > torchserve.out 2>&1) && \
	  { $(CLIENT) wait --for 120 --logs $(RUN)/logs 2> $(RUN)/wait.err || { tail -n 20 $(RUN)/torchserve.out >&2; \
	    cat $(RUN)/wait.err >&2; \
	    echo "TorchServe did not come up: see $(RUN)/torchserve.out and $(RUN)/logs/ (make stop stops it)" >&2; exit 1; }; } && \
	  mkdir -p $(RUN)/registered && for mar in $(STORE)/*.mar; do \
	    [ -e "$$mar" ] && touch "$(RUN)/registered/$$(basename "$$mar" .mar)"; done; true; fi

# Registration parameters override the archive's model-config.yaml when given:
#   make register BATCH_SIZE=16 MAX_BATCH_DELAY=20 WORKERS=1
REGISTER_ARGS = $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
                $(if $(MAX_BATCH_DELAY),--max-batch-delay $(MAX_BATCH_DELAY)) $(if $(WORKERS),--workers $(WORKERS))
# A model is registered again when its archive is newer than its registration (a stamp
# in run/registered/, also made for every archive the server loads at its start): after a
# change, make demo serves the new archive, not the one the running server loaded.
register: $(MODELS:%=$(RUN)/registered/%)
$(RUN)/registered/%: $(STORE)/%.mar
	$(CLIENT) register --model-store $(STORE) --only $* --replace $(REGISTER_ARGS)
	@mkdir -p $(@D) && touch $@

IMG   ?= $(DATA)/test/star/star_0099.jpg
MODEL ?= dog_breeds
predict:
	$(CLIENT) predict --model $(MODEL) $(IMG)

# Why that answer: the class's map (docs/serving.md), its picture written to run/explanations/.
explain:
	$(CLIENT) explain --model $(MODEL) --overlay $(RUN)/explanations $(IMG)

stop:
	@$(TS_ENV) $(CURDIR)/$(VENV)/bin/torchserve --stop

# Model versions, every step through the management API (serving/versions.py):
#   make rollout MODEL=flying_objects VERSION=2.0   archive export/flying_objects as 2.0, register, make default
#   make rollback MODEL=flying_objects VERSION=1.0  make 1.0 the default again
#   make retire MODEL=flying_objects VERSION=2.0    unregister 2.0
VERSIONS := $(PY) -m serving.versions --key-file $(RUN)/key_file.json
rollout:
	@test -n "$(VERSION)" || { echo "usage: make rollout MODEL=name VERSION=2.0" >&2; exit 1; }
	$(PY) -m serving.archive --exports $(EXPORT) --model-store $(STORE) --only $(MODEL) --version $(VERSION)
	$(VERSIONS) rollout --model $(MODEL) --archive $(STORE)/$(MODEL)_v$(VERSION).mar
rollback:
	@test -n "$(VERSION)" || { echo "usage: make rollback MODEL=name VERSION=1.0" >&2; exit 1; }
	$(VERSIONS) rollback --model $(MODEL) --to $(VERSION)
retire:
	@test -n "$(VERSION)" || { echo "usage: make retire MODEL=name VERSION=2.0" >&2; exit 1; }
	$(VERSIONS) retire --model $(MODEL) --version $(VERSION)

# Load on loopback against the running server (make serve): errors, lost requests,
# latency and worker memory. KILL_AFTER=10 also kills the worker after 10 s.
SOAK_SECONDS ?= 60
SOAK_CONCURRENCY ?= 32
soak:
	@mkdir -p $(RUN)
	$(PY) -m serving.soak --key-file $(RUN)/key_file.json --model $(or $(SOAK_MODEL),flying_objects) \
	  --seconds $(SOAK_SECONDS) --concurrency $(SOAK_CONCURRENCY) --out $(RUN)/soak.json \
	  $(if $(KILL_AFTER),--kill-worker-after $(KILL_AFTER))

# make demo runs these steps in turn. The server starts before the archives are
# registered, so that the demo registers them through the management API (after a
# restart, load_models=all brings them back by itself). A step that fails stops the
# demo with its name and what to do, and the TorchServe this demo started is stopped.
DEMO_STEPS := venv check-java data train export serve archive register demo-answers
# Real photos the demo sends: those that come with installed packages, and PHOTOS (a folder).
PHOTOS ?= ../shared/photos
PIDFILE := $(RUN)/tmp/.model_server.pid
SERVER_UP = [ -f $(PIDFILE) ] && kill -0 "$$(cat $(PIDFILE))" 2>/dev/null
demo:
	@if $(SERVER_UP); then was_up=1; else was_up=; fi; \
	for step in $(DEMO_STEPS); do \
	  $(MAKE) --no-print-directory $$step && continue; \
	  echo >&2; \
	  echo "make demo stopped: step '$$step' failed (its error is above)." >&2; \
	  case $$step in \
	    venv) echo "Check that $(PYTHON) is Python 3.10+ and that pip reaches the package index." >&2 ;; \
	    train|export) echo "What finished is kept in $(RUNS)/; make train RESUME=1 continues an interrupted run." >&2 ;; \
	    serve|register) echo "TorchServe's own log: $(RUN)/torchserve.out and $(RUN)/logs/." >&2 ;; \
	  esac; \
	  if [ -z "$$was_up" ] && $(SERVER_UP); then $(MAKE) --no-print-directory stop >/dev/null 2>&1; \
	    echo "The TorchServe this demo started has been stopped. Fix the cause and run make demo again." >&2; \
	  elif $(SERVER_UP); then \
	    echo "TorchServe is still running (it was running before make demo); stop it with: make stop" >&2; \
	  else echo "Fix the cause and run make demo again: the steps that finished are kept." >&2; fi; \
	  exit 1; \
	done

demo-answers:
	@for m in $(TRAINED); do \
	  printf '%s ' "$$m:"; $(PY) -c "import json,sys; t=json.load(open(sys.argv[1]))['test']; print(f\"Test Accuracy: {t['acc']:.0%} ({t['correct']}/{t['total']})\")" $(RUNS)/$$m/metrics.json; \
	done
	@echo "imagenet_dogs answers real photos (raw body):"
	@$(CLIENT) predict --brief --model imagenet_dogs $$($(PY) -m training.demo.photos --folder $(PHOTOS))
	@echo "dog_breeds, trained on the demo's shapes, answers the same photos (its dog detector is"
	@echo "EfficientNet-Lite0's ImageNet classes; the breeds it knows are shapes):"
	@$(CLIENT) predict --brief --model dog_breeds $$($(PY) -m training.demo.photos --folder $(PHOTOS))
	@echo "flying_objects answers (multipart upload):"
	@$(CLIENT) predict --brief --multipart --model flying_objects $(DATA)/test/*/*_0098.jpg
	@echo "Why? imagenet_dogs explains its answer (/explanations; the picture in $(RUN)/explanations/):"
	@$(CLIENT) explain --brief --model imagenet_dogs --overlay $(RUN)/explanations \
	  $$($(PY) -m training.demo.photos --folder $(PHOTOS) | head -1)
	@echo "A file that is not an image gets a 400 with a reason:"
	@$(CLIENT) predict --brief --model dog_breeds README.md || true
	@echo
	@echo "TorchServe is running with $(MODELS) (inference API http://127.0.0.1:8080)."
	@echo "Try: make predict IMG=$(DATA)/test/circle/circle_0090.jpg MODEL=flying_objects"
	@echo "Stop it with: make stop"

# KServe storage layout and manifests from the archives (serving/kserve.py): upload
# build/kserve/ to your storage, build the Dockerfile's image, apply the two manifests.
KSERVE_ARGS ?= --image image-classifiers:0.1 --storage-uri pvc://models/image-classifiers --protocol v2
kserve: archive
	$(PY) -m serving.kserve --model-store $(STORE) --out build/kserve $(KSERVE_ARGS)

# gRPC stubs, generated from the proto files inside the installed TorchServe jar.
GRPC_STUBS := serving/_grpc/inference_pb2_grpc.py
grpc: $(GRPC_STUBS)
$(GRPC_STUBS): $(VENV)/.installed
	$(PY) -m serving.grpc_client build

# The upload page on 127.0.0.1 (ui/app.py), calling the running TorchServe (make serve).
UI_PORT ?= 5000
ui: | venv
	$(PY) -m ui.app --port $(UI_PORT) --key-file $(RUN)/key_file.json

# The page's tests drive Debian's chromium (Playwright's own browser download cannot
# run on offline machines): installed here when missing, which needs root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make test: the browser tests need chromium; installing Debian's package with apt-get (root)..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else echo "The browser tests need chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

# Training throughput (images/s) per model, frozen vs unfrozen backbone, per
# data-loader worker count: build/bench/train.md.
bench-train: | venv
	$(PY) -m bench.train

# The serving benchmark (bench/run.py): TorchServe with this project's handler vs the
# in-process figure, TorchServe's built-in handler (which needs captum: installed here,
# for the benchmark only) and a Flask-style server; then the dog app (handlers/dog_breeds.py
# with its dog detector) on real photos. build/bench/results.md and .json; with
# BENCH_ARGS="--publish docs/performance-results.md" the same markdown goes to the docs too.
# `make bench-int8`: the same on int8 exports of the trained runs (build/export-int8,
# results in build/bench-int8/), every contestant on the same int8 file, on the CPU (int8
# kernels are CPU kernels).
BENCH_ARGS ?=
bench: bench-deps
	$(PY) -m bench.run $(BENCH_ARGS)
bench-int8: bench-deps
	$(MAKE) export EXPORT=build/export-int8 QUANTIZE=int8
	$(PY) -m bench.run --device cpu --exports build/export-int8 --out build/bench-int8 $(BENCH_ARGS)
# The forward pass's FLOP rate against a matrix multiply's, one thread (bench/flops.py):
# how much a faster compilation could still win. build/bench/flops.json.
bench-flops: | venv
	$(PY) -m bench.flops $(FLOPS_ARGS)
# Whether the explanations' maps point at real dogs pasted on canvases, and the maps' cost
# beside the plain answer's (bench/explain.py). build/bench/explain.{json,md}.
bench-explain: | venv
	$(PY) -m bench.explain $(EXPLAIN_ARGS)
bench-deps: venv check-java
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-bench.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
test-deps: venv
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-bench.txt -r requirements-data.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# The whole suite: real TorchServe servers (Java) and a real browser. make browser installs
# Debian's chromium with apt-get when it is missing, and says so first. The tests also run
# the benchmark's built-in-handler contestants (captum) and train on scikit-learn's digits.
test: venv check-java grpc browser test-deps
	$(PY) -m pytest -q tests

# Everything that starts no TorchServe, no browser and nothing over about 2 s: about a minute.
test-fast: venv test-deps
	$(PY) -m pytest -q -m "not torchserve and not browser and not slow" tests

# The linter, the formatter's check and the type check of the runtime (pyproject.toml holds
# their settings); `ruff format .` and `ruff check --fix .` mend most of what they report.
lint: venv
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-lint.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean: 
	@if [ -f $(RUN)/tmp/.model_server.pid ]; then $(MAKE) stop; fi
	rm -rf $(DATA) $(RUNS) $(EXPORT) $(STORE) $(RUN) build serving/_grpc
