rockspec_format = "3.0"
package = "iothub-jobs"
version = "scm-1"

source = {
  url = "git+https://github.com/iothub-jobs/iothub-jobs.git",
}

description = {
  summary = "Schedule, monitor and roll out Azure IoT Hub jobs from Lua (C core, libcurl, OpenSSL)",
  detailed = [[
A Lua module with a C core for Azure IoT Hub jobs: direct-method and twin-update jobs chosen
by a twin query, scheduled, monitored and listed exactly as the service API expects. SAS
authentication, request building and the retry/monitor policies are in C; libcurl is kept in
a separate module so OpenResty can load the core without it.
]],
  license = "MIT",
  labels = { "azure", "iot", "iothub", "jobs" },
}

dependencies = {
  "lua >= 5.1, < 5.5",
}

external_dependencies = {
  -- Only the library is probed: Debian keeps curl/curl.h under the multiarch include
  -- directory, which gcc searches but LuaRocks' header probe does not.
  CURL = { library = "curl" },
  OPENSSL = { header = "openssl/hmac.h", library = "crypto" },
}

build = {
  type = "builtin",
  modules = {
    ["iothub.core"] = {
      -- Keep in step with CORE_SRC in the Makefile: spec/unit/packaging_spec.lua compares them.
      sources = { "csrc/core.c", "csrc/sas.c", "csrc/codec.c", "csrc/json.c", "csrc/clock.c",
        "csrc/validate.c", "csrc/request.c", "csrc/job_request.c", "csrc/policy.c",
        "csrc/query.c", "csrc/sandbox.c" },
      incdirs = { "csrc", "$(OPENSSL_INCDIR)" },
      libdirs = { "$(OPENSSL_LIBDIR)" },
      libraries = { "crypto", "m" },
    },
    ["iothub.curl"] = {
      sources = { "csrc/curl.c", "csrc/curl_transfer.c", "csrc/curl_easy.c", "csrc/curl_multi.c" },
      incdirs = { "csrc", "$(CURL_INCDIR)" },
      libdirs = { "$(CURL_LIBDIR)" },
      libraries = { "curl" },
    },
    ["iothub.init"] = "lua/iothub/init.lua",
    ["iothub.client"] = "lua/iothub/client.lua",
    ["iothub.config"] = "lua/iothub/config.lua",
    ["iothub.credentials"] = "lua/iothub/credentials.lua",
    ["iothub.errors"] = "lua/iothub/errors.lua",
    ["iothub.jobs"] = "lua/iothub/jobs.lua",
    ["iothub.job_request"] = "lua/iothub/job_request.lua",
    ["iothub.json"] = "lua/iothub/json.lua",
    ["iothub.pager"] = "lua/iothub/pager.lua",
    ["iothub.pipeline"] = "lua/iothub/pipeline.lua",
    ["iothub.registry"] = "lua/iothub/registry.lua",
    ["iothub.scheduler"] = "lua/iothub/scheduler.lua",
    ["iothub.transport.curl"] = "lua/iothub/transport/curl.lua",
    ["iothub.transport.cosocket"] = "lua/iothub/transport/cosocket.lua",
    ["iothub.http1"] = "lua/iothub/http1.lua",
    ["iothub.definitions"] = "lua/iothub/definitions.lua",
    ["iothub.rollout"] = "lua/iothub/rollout.lua",
    ["iothub.cli"] = "lua/iothub/cli/init.lua",
    ["iothub.cli.args"] = "lua/iothub/cli/args.lua",
    ["iothub.cli.commands"] = "lua/iothub/cli/commands.lua",
    ["iothub.cli.connection"] = "lua/iothub/cli/connection.lua",
    ["iothub.cli.exitcodes"] = "lua/iothub/cli/exitcodes.lua",
    ["iothub.cli.output"] = "lua/iothub/cli/output.lua",
    ["iothub.cli.progress"] = "lua/iothub/cli/progress.lua",
  },
  install = { bin = { ["iothub-jobs"] = "bin/iothub-jobs" } },
  copy_directories = { "examples" },
}

test_dependencies = { "busted" }
test = { type = "busted" }
