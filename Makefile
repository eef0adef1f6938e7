# The two commands the README opens with: `make demo` and `make test`.
# Each runs the setup first (idempotent, fast when everything is there).
VENV := .venv/bin

.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/natctl demo

test: setup
	$(VENV)/python -m pytest

bench: setup
	$(VENV)/natctl bench

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis
	-$(MAKE) -s -C bpf clean
