# vunet build, test and developer targets. `make help` lists them.
GO        ?= go
BIN       := bin/vunet
PKGS      := ./...
STATICCHECK_VERSION ?= v0.8.2
FUZZTIME  ?= 10s
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/vunet/vunet/internal/version.Version=$(VERSION)

.PHONY: all build test test-short fuzz-smoke mutate bench lint demo guest man help clean

all: build

help:
	@echo "build       build $(BIN)"
	@echo "test        all tests with -race, including real-QEMU tests when QEMU is installed"
	@echo "test-short  unit tests only (-short)"
	@echo "fuzz-smoke  run every fuzz target for FUZZTIME (default $(FUZZTIME))"
	@echo "mutate      mutation testing (go-gremlins) of vhost, endpoint, forward, services; report in build/mutate"
	@echo "bench       Go benchmarks for the hot paths"
	@echo "lint        gofmt, go vet, staticcheck (fetched with go run)"
	@echo "demo        boot a test guest under QEMU against vunet and show what it achieves"

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/vunet

# The real-guest tests run in a private network namespace without network
# access, so the guest (Debian kernel + busybox) is fetched and built first.
# The real-client suites (e2e, e2e/boot) run one package at a time and
# without the race detector (they drive the real binary, not in-process
# code), so that emulated guests do not fight unit tests for two cores.
# The churn soak (./soak) runs on its own, without the race detector (its
# shadow memory would hide the RSS it checks), for SOAK.
UNIT_PKGS = $(shell $(GO) list ./... | grep -v -e '/e2e$$' -e '/e2e/boot$$' -e '/e2e/perf' -e '/soak$$')
E2E_PKGS  = ./e2e ./e2e/boot
SOAK      ?= 5m

test: guest
	$(GO) test -race -timeout 30m $(UNIT_PKGS)
	VUNET_SOAK=$(SOAK) $(GO) test -count=1 -timeout 30m ./soak
	$(GO) test -p 1 -timeout 40m $(E2E_PKGS)

guest:
	./scripts/build-guest.sh

test-short:
	$(GO) test -short -race $(PKGS)

fuzz-smoke:
	./scripts/fuzz-smoke.sh $(FUZZTIME)

# Not part of test: it takes about an hour (docs/testing.md).
mutate:
	./scripts/mutate.sh $(MUTATE_DIRS)

bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) $(PKGS)

demo: build
	./scripts/demo.sh

# The man page is generated from the CLI definition.
man: build
	$(BIN) man > docs/vunet.8

clean:
	rm -rf bin build
