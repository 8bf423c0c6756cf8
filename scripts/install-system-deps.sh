#!/bin/sh
# Installs the real Postfix and Dovecot 2.3 that the end-to-end tests drive (and lua5.4 for the
# Lua script's unit tests, PostgreSQL for the shared-store tests' throwaway cluster), from
# Debian's packages.
# Only as root and only what is missing; elsewhere the e2e and PostgreSQL tests skip with a loud reason.
set -eu
if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: not root, not installing Postfix/Dovecot (e2e tests will skip)" >&2
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-system-deps: no apt-get; e2e tests will skip" >&2; exit 0; }
missing=""
[ -x /usr/sbin/postfix ] || missing="$missing postfix"
[ -x /usr/sbin/dovecot ] || missing="$missing dovecot-core"
[ -e /usr/lib/dovecot/modules/auth/libauthdb_lua.so ] || missing="$missing dovecot-auth-lua"
[ -x /usr/lib/dovecot/imap ] || missing="$missing dovecot-imapd"
command -v lua5.4 >/dev/null 2>&1 || missing="$missing lua5.4"   # runs dovecot/mailcloak.lua in unit tests
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"   # tests/pg_cluster.py
[ -z "$missing" ] && exit 0
echo "install-system-deps: installing$missing" >&2
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# Keep the packages' own services from starting: tests start private instances.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
status=0
{ apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; } || status=$?
[ -n "$created_policy" ] && rm -f "$policy"
exit $status
