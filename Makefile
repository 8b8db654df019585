# Builds the two C modules for Lua 5.4 (build/5.4) and LuaJIT 2.1 (build/luajit):
#   iothub/core.so  - SAS, JSON, request building, policies; no libcurl (OpenResty loads this one)
#   iothub/curl.so  - the libcurl transport
# All variables are overridable: make LUA_INCDIR=... CC=clang

LUA          ?= lua5.4
LUAJIT       ?= luajit
LUA_VERSION  ?= 5.4
LUA_INCDIR   ?= /usr/include/lua$(LUA_VERSION)
LUAJIT_INCDIR ?= /usr/include/luajit-2.1
BUILD        ?= build/$(LUA_VERSION)
BUSTED       ?= busted

CC           ?= cc
OPTFLAGS     ?= -O2 -g
WARNFLAGS    ?= -Wall -Wextra -Werror=implicit-function-declaration
CFLAGS_ALL    = $(OPTFLAGS) $(WARNFLAGS) -std=gnu99 -fPIC $(EXTRA_CFLAGS)
LIBFLAG      ?= -shared
CURL_CFLAGS  ?= $(shell pkg-config --cflags libcurl 2>/dev/null)
CURL_LIBS    ?= $(shell pkg-config --libs libcurl 2>/dev/null || echo -lcurl)
CRYPTO_LIBS  ?= $(shell pkg-config --libs libcrypto 2>/dev/null || echo -lcrypto)

CORE_SRC = csrc/core.c csrc/sas.c csrc/codec.c csrc/json.c csrc/clock.c \
           csrc/validate.c csrc/request.c csrc/job_request.c csrc/policy.c csrc/query.c \
           csrc/sandbox.c
CURL_SRC = csrc/curl.c csrc/curl_transfer.c csrc/curl_easy.c csrc/curl_multi.c
HEADERS  = $(wildcard csrc/*.h)

# Specs that start no server or emulator: make check, make asan and make valgrind run these.
UNIT_SPECS = spec/unit
# busted's output handler; .ci/test passes spec/support/counting_output.lua to read the counts.
BUSTED_OUTPUT ?= utfTerminal

PREFIX          ?= /usr/local
LUA_CMODULE_DIR ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
LUA_MODULE_DIR  ?= $(PREFIX)/share/lua/$(LUA_VERSION)
BINDIR          ?= $(PREFIX)/bin

.PHONY: all luajit both check test test-lua54 test-luajit lint bench bench-emulator clean install demo test-openresty

all: $(BUILD)/iothub/core.so $(BUILD)/iothub/curl.so

luajit:
	$(MAKE) all LUA_VERSION=luajit LUA_INCDIR=$(LUAJIT_INCDIR) BUILD=build/luajit

both: all luajit

$(BUILD)/iothub/core.so: $(CORE_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -I$(LUA_INCDIR) -Icsrc $(LIBFLAG) -o $@ $(CORE_SRC) $(CRYPTO_LIBS) -lm

$(BUILD)/iothub/curl.so: $(CURL_SRC) $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -I$(LUA_INCDIR) -Icsrc $(CURL_CFLAGS) $(LIBFLAG) -o $@ $(CURL_SRC) $(CURL_LIBS)

# The test command README.md documents: build, lint, busted under Lua 5.4 and LuaJIT.
test:
	bash .ci/test

# Runs the seed tutorial's flow against the local emulator (starts and stops it).
demo: both
	bash examples/demo.sh

bench: both
	$(LUA) bench/getjob.lua
	$(LUA) bench/device_rows.lua
	$(LUA) bench/monitors.lua
	$(LUAJIT) bench/getjob.lua
	$(LUAJIT) bench/device_rows.lua

# A twin-update job over 100,000 simulated devices, and paging out its 100,000 device rows;
# getJob latency while hostile clients attack the emulator.
bench-emulator: both
	$(LUA) bench/emulator_scale.lua
	$(LUA) bench/query.lua
	$(LUA) bench/emulator_hostile.lua

# The cosocket transport in a real nginx, and the dashboard in headless Chromium.
test-openresty: luajit
	bash spec/openresty/run.sh

# The fast loop for contributors: the unit specs (no servers) under Lua 5.4 and LuaJIT, ~15 s.
check: both
	$(BUSTED) --lua=$(LUA) -o $(BUSTED_OUTPUT) $(UNIT_SPECS)
	$(BUSTED) --lua=$(LUAJIT) -r luajit -o $(BUSTED_OUTPUT) $(UNIT_SPECS)

test-lua54: all
	$(BUSTED) --lua=$(LUA) spec

test-luajit: luajit
	$(BUSTED) --lua=$(LUAJIT) -r luajit spec

include fuzz/fuzz.mk

lint:
	luacheck .

clean:
	rm -rf build

install: all
	install -d $(DESTDIR)$(LUA_CMODULE_DIR)/iothub $(DESTDIR)$(LUA_MODULE_DIR)
	install -m 0755 $(BUILD)/iothub/core.so $(BUILD)/iothub/curl.so $(DESTDIR)$(LUA_CMODULE_DIR)/iothub/
	cp -R lua/iothub $(DESTDIR)$(LUA_MODULE_DIR)/
	install -d $(DESTDIR)$(BINDIR)
	install -m 0755 bin/iothub-jobs $(DESTDIR)$(BINDIR)/iothub-jobs
