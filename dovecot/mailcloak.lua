-- mailcloak passdb for Dovecot (2.3.19+ and 2.4): app passwords are checked by the mailcloak daemon.
--
-- Every PLAIN/LOGIN attempt is POSTed to <url>/dovecot/passdb as a form
-- (user, password, service, remote_ip, local_ip, mechanism, session); the daemon answers
-- status 200 with key=value lines, "result=ok|password_mismatch|user_unknown|user_disabled|
-- internal_failure" and "reason=...". Anything else (daemon down, timeout, non-200) is an
-- internal failure, which Dovecot reports as a temporary failure.
--
-- Settings (key=value lines, '#' comments):
--   url=http://127.0.0.1:8425          the daemon's http.listen, as a URL (use an IP, not a name)
--   secret_file=/etc/mailcloak/dovecot-secret   optional; same file as the daemon's
--                                       http.shared_secret_file, sent as "Authorization: Bearer"
--   timeout_msecs=10000                 optional; per request
-- Dovecot 2.3: read from the file named by the environment variable MAILCLOAK_DOVECOT_LUA_CONF
-- (list it in import_environment) or /etc/mailcloak/dovecot-lua.conf.
-- Dovecot 2.4: the same keys may be given in the passdb's lua_settings { } block instead;
-- without them the file is read as in 2.3.

local DEFAULT_CONF = "/etc/mailcloak/dovecot-lua.conf"
local ENDPOINT = "/dovecot/passdb"
local USER_AGENT = "dovecot-mailcloak-lua"

local settings = nil       -- { url=, secret_file=, timeout_msecs= }
local secret = nil         -- contents of secret_file, or nil
local client = nil         -- dovecot.http client, made once per auth-worker process
local init_error = nil
local init_args = nil      -- 2.4: the lua_settings table given to script_init

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

local function read_conf_file(path)
  local f, err = io.open(path, "r")
  if f == nil then
    return nil, "cannot read settings file " .. path .. ": " .. tostring(err)
  end
  local conf = {}
  for line in f:lines() do
    line = trim(line)
    if line ~= "" and line:sub(1, 1) ~= "#" then
      local key, value = line:match("^([%w_]+)%s*=%s*(.-)$")
      if key ~= nil then
        conf[key] = value
      end
    end
  end
  f:close()
  return conf
end

local function read_secret(path)
  local f, err = io.open(path, "r")
  if f == nil then
    return nil, "cannot read secret_file " .. path .. ": " .. tostring(err)
  end
  local value = trim(f:read("*a") or "")
  f:close()
  if value == "" then
    return nil, "secret_file " .. path .. " is empty"
  end
  return value
end

local function make_client(timeout_msecs)
  -- Dovecot 2.3 setting names first (2.3 ignores unknown names, 2.4 refuses them) ...
  local ok, c = pcall(dovecot.http.client, {
    request_timeout_msecs = timeout_msecs,
    connect_timeout_msecs = 2000,
    max_attempts = 1,
    user_agent = USER_AGENT,
  })
  if ok then
    return c
  end
  -- ... then the 2.4 names (Dovecot settings without the http_client_ prefix).
  return dovecot.http.client({
    request_timeout = tostring(timeout_msecs) .. "ms",
    connect_timeout = "2s",
    request_max_attempts = "1",
    user_agent = USER_AGENT,
  })
end

-- Loads settings, secret and client; on failure remembers why and tries again at the next login.
local function ensure_ready(args)
  if client ~= nil then
    return true
  end
  local conf
  if type(args) == "table" and args.url ~= nil and args.url ~= "" then
    conf = args
  else
    local path = os.getenv("MAILCLOAK_DOVECOT_LUA_CONF")
    if path == nil or path == "" then
      path = DEFAULT_CONF
    end
    local err
    conf, err = read_conf_file(path)
    if conf == nil then
      init_error = err
      return false
    end
    if conf.url == nil or conf.url == "" then
      init_error = "no url= in " .. path
      return false
    end
  end
  local url = conf.url:gsub("/+$", "")
  local timeout = tonumber(conf.timeout_msecs or "") or 10000
  local s = nil
  if conf.secret_file ~= nil and conf.secret_file ~= "" then
    local err
    s, err = read_secret(conf.secret_file)
    if s == nil then
      init_error = err
      return false
    end
  end
  local ok, c = pcall(make_client, timeout)
  if not ok then
    init_error = "cannot create the HTTP client: " .. tostring(c)
    return false
  end
  settings = { url = url, timeout_msecs = timeout }
  secret = s
  client = c
  init_error = nil
  return true
end

local function form_escape(value)
  return (tostring(value or ""):gsub("[^%w%-%._~]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

local function parse_answer(payload)
  local fields = {}
  for key, value in payload:gmatch("([%w_]+)=([^\r\n]*)") do
    if fields[key] == nil then
      fields[key] = value
    end
  end
  return fields
end

local RESULTS = {
  password_mismatch = "PASSDB_RESULT_PASSWORD_MISMATCH",
  user_unknown = "PASSDB_RESULT_USER_UNKNOWN",
  user_disabled = "PASSDB_RESULT_USER_DISABLED",
  internal_failure = "PASSDB_RESULT_INTERNAL_FAILURE",
}

function script_init(args)
  -- Nothing is read here: Dovecot also runs script_init in the auth process (user dovecot),
  -- which never verifies a password when the passdb runs in auth-workers and may not be allowed
  -- to read the secret file. Settings, secret and HTTP client are set up at the first login (in
  -- the auth-worker), and a missing or wrong setting is reported then, as an internal failure,
  -- at every login until it is fixed. Never fail here: 2.4 makes that fatal for auth.
  init_args = args
  return 0
end

function script_deinit()
end

function auth_password_verify(req, password)
  if not ensure_ready(init_args) then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "mailcloak: " .. tostring(init_error)
  end
  local body = table.concat({
    "user=" .. form_escape(req.user),
    "password=" .. form_escape(password),
    "service=" .. form_escape(req.service or req.protocol),
    "remote_ip=" .. form_escape(req.remote_ip),
    "local_ip=" .. form_escape(req.local_ip),
    "mechanism=" .. form_escape(req.mechanism),
    "session=" .. form_escape(req.session),
  }, "&")
  local request = client:request({ url = settings.url .. ENDPOINT, method = "POST" })
  request:add_header("Content-Type", "application/x-www-form-urlencoded")
  if secret ~= nil then
    request:add_header("Authorization", "Bearer " .. secret)
  end
  request:set_payload(body)
  local ok, response = pcall(request.submit, request)
  if not ok then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "mailcloak: request failed: " .. tostring(response)
  end
  local status = response:status()
  if status ~= 200 then
    local detail = parse_answer(response:payload() or "").reason or response:reason() or ""
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
      "mailcloak: HTTP status " .. tostring(status) .. " " .. detail
  end
  local answer = parse_answer(response:payload() or "")
  if answer.result == "ok" then
    return dovecot.auth.PASSDB_RESULT_OK, {}
  end
  local name = RESULTS[answer.result or ""]
  if name == nil then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
      "mailcloak: unexpected answer " .. tostring(answer.result)
  end
  return dovecot.auth[name], "mailcloak: " .. (answer.reason or answer.result)
end

function auth_passdb_lookup(req)
  -- Credential lookups (CRAM-MD5, DIGEST-MD5, SCRAM, doveadm auth lookup) would need the
  -- plaintext or a Dovecot-side hash; mailcloak keeps secrets to itself. Restrict this passdb
  -- to PLAIN/LOGIN (2.3: mechanisms = plain login; 2.4: mechanisms_filter = plain login).
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
    "mailcloak: credentials lookups are not supported; use this passdb for PLAIN/LOGIN only"
end

-- Dovecot 2.4 auth cache key: the service and the remote IP are part of it, so that a cached
-- SMTP success of an app can never answer an IMAP login, nor a login from outside the app's
-- networks (2.3 uses the passdb's cache_key= argument instead).
function auth_passdb_get_cache_key()
  return "%{user}\t%{protocol}\t%{remote_ip}"
end
