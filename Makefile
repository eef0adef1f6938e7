# The two commands the README opens with: `make demo` and `make test`.
# Each runs the setup first (idempotent, fast when everything is there).
VENV := .venv/bin

.PHONY: setup demo test check bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/natctl demo

test: setup check
	$(VENV)/python -m pytest

# Lint over the package, its tests and the bench; types over the package (clean; part of make test).
check: setup
	$(VENV)/ruff check natctl tests bench
	$(VENV)/mypy

bench: setup
	$(VENV)/natctl bench

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis
	-$(MAKE) -s -C bpf clean
