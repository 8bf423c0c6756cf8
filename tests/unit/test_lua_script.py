"""dovecot/mailcloak.lua under a plain Lua 5.4 with a stand-in `dovecot` table.

The real Dovecot 2.3 runs the script in tests/e2e/test_dovecot.py; Dovecot 2.4 is not available
here, so its differences are exercised against a stand-in that behaves as 2.4's Lua API does
(source: dlua-dovecot-http.c in 2.4): settings come as a table to script_init(args), the HTTP
client refuses unknown setting names (2.3's `*_msecs`, `max_attempts`) and takes values as text.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dovecot" / "mailcloak.lua"
LUA = shutil.which("lua5.4") or shutil.which("lua")

HARNESS = r"""
local mode, script, conf_env = arg[1], arg[2], arg[3]
local responses = {}
local function out(...) print(table.concat({...}, " ")) end

local RESULTS = { PASSDB_RESULT_OK = 1, PASSDB_RESULT_PASSWORD_MISMATCH = -1,
  PASSDB_RESULT_USER_UNKNOWN = -2, PASSDB_RESULT_USER_DISABLED = -3,
  PASSDB_RESULT_INTERNAL_FAILURE = -4, PASSDB_RESULT_NEXT = -5 }
local NAMES = {}
for k, v in pairs(RESULTS) do NAMES[v] = k end

dovecot = {
  auth = RESULTS,
  i_error = function(m) out("i_error", m) end,
  http = {
    client = function(settings)
      local keys = {}
      for k, v in pairs(settings) do
        if mode == "2.4" and (k:match("_msecs$") or k == "max_attempts") then
          error("Invalid HTTP client setting: " .. k .. " is unknown setting")
        end
        table.insert(keys, k .. "=" .. tostring(v))
      end
      table.sort(keys)
      out("client", table.concat(keys, ","))
      return {
        request = function(self, r)
          out("request", r.method, r.url)
          local req = {}
          function req:add_header(n, v) out("header", n, v) end
          function req:set_payload(p) out("payload", p) end
          function req:submit()
            local resp = table.remove(responses, 1)
            if resp == "error" then error("connect failed", 0) end
            return {
              status = function() return resp.status end,
              payload = function() return resp.payload end,
              reason = function() return resp.reason or "" end,
              header = function() return "" end,
            }
          end
          return req
        end,
      }
    end,
  },
}

-- os.getenv stand-in: the harness decides what MAILCLOAK_DOVECOT_LUA_CONF holds.
local real_getenv = os.getenv
os.getenv = function(name)
  if name == "MAILCLOAK_DOVECOT_LUA_CONF" then
    if conf_env == "-" then return nil end
    return conf_env
  end
  return real_getenv(name)
end

dofile(script)

local function show(result, extra)
  if type(extra) == "table" then
    local n = 0
    for _ in pairs(extra) do n = n + 1 end
    out("result", NAMES[result], "table", tostring(n))
  else
    out("result", NAMES[result], tostring(extra))
  end
end

local req = { user = "mailer", service = "smtp", remote_ip = "192.0.2.1", local_ip = "127.0.0.1",
              mechanism = "PLAIN", session = "abc" }
for line in io.lines() do
  local cmd, rest = line:match("^(%S+)%s*(.*)$")
  if cmd == "init" then
    if rest == "" then out("init", tostring(script_init())) else
      local t = {}
      for k, v in rest:gmatch("([%w_]+)=(%S+)") do t[k] = v end
      out("init", tostring(script_init(t)))
    end
  elseif cmd == "respond" then
    if rest == "error" then table.insert(responses, "error") else
      local status, payload = rest:match("^(%d+) (.*)$")
      table.insert(responses, { status = tonumber(status), payload = payload:gsub("\\n", "\n") })
    end
  elseif cmd == "verify" then
    show(auth_password_verify(req, rest))
  elseif cmd == "service" then
    req.service = nil
    req.protocol = rest
  elseif cmd == "lookup" then
    show(auth_passdb_lookup(req))
  elseif cmd == "cachekey" then
    out("cachekey", auth_passdb_get_cache_key())
  end
end
"""

pytestmark = pytest.mark.skipif(
    LUA is None, reason="LUA SCRIPT TESTS SKIPPED: no lua5.4 interpreter (apt-get install lua5.4)")


@pytest.fixture
def harness(tmp_path):
    path = tmp_path / "harness.lua"
    path.write_text(HARNESS)
    return path


def run(harness, mode: str, conf: Path | str | None, commands: list[str]) -> list[str]:
    result = subprocess.run([LUA, str(harness), mode, str(SCRIPT), str(conf) if conf else "-"],
                            input="\n".join(commands) + "\n", capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def conf_23(tmp_path):
    (tmp_path / "secret").write_text("  the-secret\n")
    conf = tmp_path / "dovecot-lua.conf"
    conf.write_text(f"# comment\nurl = http://127.0.0.1:8425/\nsecret_file={tmp_path / 'secret'}\n")
    return conf


def test_23_settings_file_request_and_answers(harness, conf_23):
    lines = run(harness, "2.3", conf_23, [
        "init",
        "respond 200 result=ok",
        "verify p@ss word+&=%\u00e9",
        "respond 200 result=password_mismatch\\nreason=password mismatch",
        "verify wrong",
        "respond 200 result=user_unknown\\nreason=unknown app",
        "verify x",
        "respond 200 result=user_disabled\\nreason=apps may authenticate only for sending",
        "verify x",
        "respond 200 result=surprise",
        "verify x",
        "respond 401 result=internal_failure\\nreason=unauthorized",
        "verify x",
        "respond error",
        "verify x",
    ])
    assert lines[0] == "init 0"
    # One client, made at the first login with the 2.3 setting names.
    clients = [line for line in lines if line.startswith("client ")]
    assert clients == ["client connect_timeout_msecs=2000,max_attempts=1,request_timeout_msecs=10000,"
                       "user_agent=dovecot-mailcloak-lua"]
    assert "request POST http://127.0.0.1:8425/dovecot/passdb" in lines
    assert "header Content-Type application/x-www-form-urlencoded" in lines
    assert "header Authorization Bearer the-secret" in lines
    payload = next(line for line in lines if line.startswith("payload "))
    assert payload == ("payload user=mailer&password=p%40ss%20word%2B%26%3D%25%C3%A9&service=smtp"
                       "&remote_ip=192.0.2.1&local_ip=127.0.0.1&mechanism=PLAIN&session=abc")
    results = [line for line in lines if line.startswith("result ")]
    assert results == [
        "result PASSDB_RESULT_OK table 0",
        "result PASSDB_RESULT_PASSWORD_MISMATCH mailcloak: password mismatch",
        "result PASSDB_RESULT_USER_UNKNOWN mailcloak: unknown app",
        "result PASSDB_RESULT_USER_DISABLED mailcloak: apps may authenticate only for sending",
        "result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: unexpected answer surprise",
        "result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: HTTP status 401 unauthorized",
        "result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: request failed: connect failed",
    ]


def test_24_lua_settings_table_and_setting_names(harness, tmp_path):
    (tmp_path / "s").write_text("s24\n")
    lines = run(harness, "2.4", None, [
        f"init url=http://127.0.0.1:9000 secret_file={tmp_path / 's'}",
        "service submission",
        "respond 200 result=ok",
        "verify pw",
        "cachekey",
    ])
    assert lines[0] == "init 0"
    assert [line for line in lines if line.startswith("client ")] == [
        "client connect_timeout=2s,request_max_attempts=1,request_timeout=10000ms,"
        "user_agent=dovecot-mailcloak-lua"]
    assert "request POST http://127.0.0.1:9000/dovecot/passdb" in lines
    assert "header Authorization Bearer s24" in lines
    assert any("&service=submission&" in line for line in lines if line.startswith("payload "))
    assert "result PASSDB_RESULT_OK table 0" in lines
    assert "cachekey %{user}\t%{protocol}\t%{remote_ip}" in lines


def test_24_without_lua_settings_reads_the_file(harness, conf_23):
    lines = run(harness, "2.4", conf_23, ["init", "respond 200 result=ok", "verify pw"])
    assert "request POST http://127.0.0.1:8425/dovecot/passdb" in lines
    assert "result PASSDB_RESULT_OK table 0" in lines


def test_missing_settings_are_an_internal_failure_at_each_login_until_fixed(harness, tmp_path):
    conf = tmp_path / "later.conf"
    lines = run(harness, "2.3", conf, ["init", "verify pw"])
    assert lines[0] == "init 0"
    assert lines[-1].startswith("result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: cannot read settings file")
    assert str(conf) in lines[-1]

    conf.write_text("secret_file=/nonexistent\n")
    lines = run(harness, "2.3", conf, ["init", "verify pw"])
    assert lines[-1] == f"result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: no url= in {conf}"

    conf.write_text("url=http://127.0.0.1:1\nsecret_file=/nonexistent/secret\n")
    lines = run(harness, "2.3", conf, ["init", "verify pw"])
    assert lines[-1].startswith("result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: cannot read "
                                "secret_file /nonexistent/secret")


def test_default_settings_path_when_the_environment_variable_is_unset(harness):
    lines = run(harness, "2.3", None, ["init", "verify pw"])
    if Path("/etc/mailcloak/dovecot-lua.conf").exists():
        pytest.skip("this machine has a real /etc/mailcloak/dovecot-lua.conf")
    assert "/etc/mailcloak/dovecot-lua.conf" in lines[-1]


def test_credentials_lookups_are_refused(harness, conf_23):
    lines = run(harness, "2.3", conf_23, ["init", "lookup"])
    assert lines[-1].startswith("result PASSDB_RESULT_INTERNAL_FAILURE mailcloak: credentials lookups "
                                "are not supported")
