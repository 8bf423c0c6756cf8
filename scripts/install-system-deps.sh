#!/bin/sh
# Installs the real Postfix the end-to-end tests drive, from Debian's packages.
# Only as root and only when missing; elsewhere the e2e tests skip with a loud reason.
set -eu
if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: not root, not installing Postfix (e2e tests will skip)" >&2
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "install-system-deps: no apt-get; e2e tests will skip" >&2; exit 0; }
missing=""
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || missing="$missing postfix"
[ -z "$missing" ] && exit 0
echo "install-system-deps: installing$missing" >&2
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing >/dev/null
