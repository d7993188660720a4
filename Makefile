# vunet build, test and developer targets. `make help` lists them.
GO        ?= go
BIN       := bin/vunet
PKGS      := ./...
FUZZTIME  ?= 10s
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/vunet/vunet/internal/version.Version=$(VERSION)

.PHONY: all build test test-short fuzz-smoke bench lint demo guest help clean

all: build

help:
	@echo "build       build $(BIN)"
	@echo "test        all tests with -race, including real-QEMU tests when QEMU is installed"
	@echo "test-short  unit tests only (-short)"
	@echo "fuzz-smoke  run every fuzz target for FUZZTIME (default $(FUZZTIME))"
	@echo "bench       Go benchmarks for the hot paths"
	@echo "lint        gofmt, go vet"
	@echo "demo        boot a test guest under QEMU against vunet and show what it achieves"

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/vunet

# The real-guest tests run in a private network namespace without network
# access, so the guest (Debian kernel + busybox) is fetched and built first.
test: guest
	$(GO) test -race -timeout 40m $(PKGS)

guest:
	./scripts/build-guest.sh

test-short:
	$(GO) test -short -race $(PKGS)

fuzz-smoke:
	./scripts/fuzz-smoke.sh $(FUZZTIME)

bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

demo: build
	./scripts/demo.sh

clean:
	rm -rf bin build
