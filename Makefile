# capvisor developer entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
HOST_TRIPLE := x86_64-unknown-linux-gnu
STATIC_INIT := target/$(HOST_TRIPLE)/release/capvisor-guest-init
APT_PACKAGES := capnproto libcapnp-dev qemu-system-x86 busybox-static python3-venv mmdebstrap e2fsprogs

.PHONY: help deps build guest-init kernel demo lint test interop bench soak clean

help:
	@echo "make deps    install Debian packages capvisor needs (capnproto, qemu-system-x86, busybox-static, python3-venv)"
	@echo "make build   build every binary (release) and the static guest-init"
	@echo "make kernel  build the minimal guest kernel (guest/kernel/, minutes; cached)"
	@echo "make demo    the main job: serve, log in, boot a real VM through capabilities, run a command, clean up"
	@echo "make lint    cargo fmt --check, clippy (all targets, warnings denied) and rustdoc (warnings denied)"
	@echo "make test    make lint, then build and run the whole test suite (boots real guests under QEMU), then the pycapnp interop test"
	@echo "make interop a pycapnp (C++ Cap'n Proto) client against a real server: login, pipelined create+exec, errors, logout"
	@echo "make bench   print boot, exec, data-path and image figures (BENCH_ARGS=--cold-image adds a cold debian image build, minutes)"
	@echo "make soak    reliability suite (docs/soak.md): 200 sessions under a hostile flood, 20 VMs, kill -9 of each process kind; bounded, loopback only"

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# The image builder fetches kernel packages with apt-get download: lists must exist.
	@ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || apt-get update -q

guest-init:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(HOST_TRIPLE) -p capvisor-guest-init

kernel:
	guest/kernel/build.sh

build: deps guest-init
	$(CARGO) build --release --workspace

demo: build
	CAPVISOR_GUEST_INIT=$(STATIC_INIT) scripts/demo.sh

# Lint levels live in the root Cargo.toml ([workspace.lints]); every
# warning fails here. deps first: the schema crate's build runs capnp.
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps
	@# The client library a GUI or agent runner links carries no server or hypervisor code.
	@bad=$$($(CARGO) tree -p capvisor-client -e normal --prefix none | grep -E '^(kvm-ioctls|kvm-bindings|seccompiler|landlock|capvisor-(vmm|kvm|images|supervisor|broker|gateway|worker)) ' | sort -u); \
	if [ -n "$$bad" ]; then echo "capvisor-client depends on server-side crates:"; echo "$$bad"; exit 1; fi

test: deps lint
	$(CARGO) build --workspace
	@# Warm the image cache once (the debian image's first build takes minutes),
	@# so no test's server start pays for it.
	CAPVISOR_GUEST_INIT=target/debug/capvisor-guest-init target/debug/capvisor serve --prepare
	$(CARGO) test --workspace -- --test-threads=2
	scripts/interop/run.sh

interop:
	$(CARGO) build --workspace
	scripts/interop/run.sh

# Extra options, e.g. make bench BENCH_ARGS="--cold-image --image-boots 5".
BENCH_ARGS ?=
bench: build
	CAPVISOR_GUEST_INIT=$(STATIC_INIT) target/release/capvisor-bench $(BENCH_ARGS)

soak: build
	CAPVISOR_GUEST_INIT=$(STATIC_INIT) target/release/capvisor-soak

clean:
	$(CARGO) clean
