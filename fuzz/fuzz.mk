# Fuzzing and sanitizer builds (included by the top-level Makefile; uses its CORE_SRC, CURL_SRC,
# HEADERS, WARNFLAGS, CURL_* and CRYPTO_LIBS). Only Debian's clang has libFuzzer.
#   make fuzz [FUZZ_SECONDS=20] [FUZZ_JOBS=1] [FUZZ_TARGETS="json query"]
#   make asan       the unit specs under an APICHECK+ASan+UBSan Lua 5.4 with sanitized modules
#   make valgrind   the unit specs under Debian's lua5.4 in valgrind
# A target is fuzz/targets/<name>.lua; its seeds are fuzz/corpus/<name>/, its dictionary (if
# any) fuzz/dict/<name>.dict. New inputs the fuzzer finds go to build/fuzz/corpus/<name>/.

FUZZ_CC       ?= clang
SAN_FLAGS      = -fsanitize=address,undefined -fno-sanitize-recover=all
FUZZ_CFLAGS    = -g -O1 -fno-omit-frame-pointer $(WARNFLAGS) -std=gnu99
FUZZ_LUA       = build/fuzz/lua-5.4.4/src
FUZZ_TARGETS  ?= $(sort $(basename $(notdir $(wildcard fuzz/targets/*.lua))))
FUZZ_SECONDS  ?= 20
FUZZ_JOBS     ?= 1
FUZZ_OBJ       = $(patsubst csrc/%.c,build/fuzz/obj/%.o,$(CORE_SRC) $(CURL_SRC))

.PHONY: fuzz fuzz-build asan asan-build valgrind
.SECONDARY: $(FUZZ_OBJ)

$(FUZZ_LUA)/liblua.a $(FUZZ_LUA)/lua: fuzz/lua-src.sh
	bash fuzz/lua-src.sh

# The C core as the harnesses link it: coverage-instrumented, with both sanitizers.
build/fuzz/obj/%.o: csrc/%.c $(HEADERS) $(FUZZ_LUA)/liblua.a
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(SAN_FLAGS) -I$(FUZZ_LUA) -Icsrc $(CURL_CFLAGS) -c -o $@ $<

build/fuzz/fuzz-%: fuzz/harness.c $(FUZZ_OBJ) $(FUZZ_LUA)/liblua.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $(SAN_FLAGS) -I$(FUZZ_LUA) -DFUZZ_TARGET='"$*"' \
	  -DFUZZ_ROOT='"$(CURDIR)"' -o $@ fuzz/harness.c $(FUZZ_OBJ) $(FUZZ_LUA)/liblua.a \
	  $(CURL_LIBS) $(CRYPTO_LIBS) -lm -ldl

fuzz-build: $(FUZZ_TARGETS:%=build/fuzz/fuzz-%)

fuzz: fuzz-build
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_JOBS=$(FUZZ_JOBS) bash fuzz/run.sh $(FUZZ_TARGETS)

# ---- sanitizer builds of the two modules, and the unit specs under them

ASAN_BUILD = build/asan
# Debian's own package paths, so that busted and the C modules it loads (lfs, lua-term,
# lua-system) come from the system as under lua5.4. Leaks are reported at exit, when busted has
# closed the Lua state; no suppression is needed (none of Lua, OpenSSL or libcurl leaks there).
ASAN_ENV = ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  LUA_PATH_5_4='$(shell $(LUA) -e 'io.write(package.path)')' \
  LUA_CPATH_5_4='$(shell $(LUA) -e 'io.write(package.cpath)')'

$(ASAN_BUILD)/iothub/core.so: $(CORE_SRC) $(HEADERS) $(FUZZ_LUA)/liblua.a
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(SAN_FLAGS) -fPIC -shared -I$(FUZZ_LUA) -Icsrc -o $@ $(CORE_SRC) $(CRYPTO_LIBS) -lm

$(ASAN_BUILD)/iothub/curl.so: $(CURL_SRC) $(HEADERS) $(FUZZ_LUA)/liblua.a
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $(SAN_FLAGS) -fPIC -shared -I$(FUZZ_LUA) -Icsrc $(CURL_CFLAGS) -o $@ $(CURL_SRC) $(CURL_LIBS)

asan-build: $(ASAN_BUILD)/iothub/core.so $(ASAN_BUILD)/iothub/curl.so $(FUZZ_LUA)/lua

asan: asan-build
	$(ASAN_ENV) $(FUZZ_LUA)/lua /usr/bin/busted --cpath='$(ASAN_BUILD)/?.so' -o $(BUSTED_OUTPUT) $(UNIT_SPECS)

# Debian's lua5.4 and the regular -O2 build of the modules, under memcheck. Definite and indirect
# leaks are errors; no suppression file is needed: the run is clean with Debian 12's lua5.4,
# OpenSSL 3.0 and libcurl 7.88 (what these leave at exit is still reachable, not lost).
VALGRIND_FLAGS ?= --error-exitcode=1 --leak-check=full --show-leak-kinds=definite,indirect \
  --errors-for-leak-kinds=definite,indirect --num-callers=30

valgrind: all
	valgrind -q $(VALGRIND_FLAGS) $(LUA) /usr/bin/busted -o $(BUSTED_OUTPUT) $(UNIT_SPECS)
