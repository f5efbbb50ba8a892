#!/usr/bin/env bash
# Install lightrelay on a Debian or Ubuntu host from this source tree: the server binaries,
# the systemd units, /etc/default/lightrelay and the nginx sites. Safe to run again (after an
# upgrade, say): binaries and units are replaced, configuration you edited is kept.
#
#   cargo build --release && sudo deploy/install.sh [--domain relay.example.org]
#
# Options:
#   --dry-run        print what would be done, change nothing
#   --prefix DIR     where binaries go: DIR/bin (default /usr/local)
#   --destdir DIR    stage everything under DIR instead of / (also: DESTDIR=DIR); no root,
#                    systemd or nginx needed, nothing is started or reloaded
#   --bin-dir DIR    where the built binaries are (default: target/release of this tree)
#   --domain HOST    put HOST in the TLS site (for lightrelay.example.com) and enable that site
#                    when /etc/letsencrypt/live/HOST/fullchain.pem exists
#   --no-start       install and enable, but do not (re)start the units or reload nginx
#   -h, --help       this text
#
# Layout: PREFIX/bin/lightrelay-{publish,subscribe} (and the `lightrelay` client when built),
# /etc/systemd/system/lightrelay-{publish,subscribe}{,@}.service, /etc/default/lightrelay,
# /etc/lightrelay/jwt-secret (a random secret for tokens, made once, mode 0600),
# /etc/nginx/conf.d/lightrelay-upstreams.conf, /etc/nginx/sites-available/lightrelay{,-tls}
# (the two-port site enabled). deploy/uninstall.sh undoes it.
set -euo pipefail

all_args="$*"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry_run=0
prefix=/usr/local
destdir=${DESTDIR:-}
bin_dir=$here/target/release
domain=
start=1
nginx_bin=${NGINX:-nginx}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "install.sh: $*" >&2
  exit 1
}

while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) prefix=${1#*=} ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift ;;
    --destdir=*) destdir=${1#*=} ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
    --bin-dir=*) bin_dir=${1#*=} ;;
    --domain) domain=${2:?--domain needs a host name}; shift ;;
    --domain=*) domain=${1#*=} ;;
    --no-start) start=0 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

[[ $prefix == /* ]] || die "--prefix must be an absolute path, not $prefix"
[[ -z $destdir || $destdir == /* ]] || destdir=$PWD/$destdir
destdir=${destdir%/}
if [[ -n $domain && ! $domain =~ ^[A-Za-z0-9.-]+$ ]]; then
  die "--domain takes a host name like relay.example.org, not $domain"
fi

# --- refuse clearly where this cannot work ------------------------------------------------------
if [[ -z $destdir ]]; then
  [[ $(id -u) == 0 ]] ||
    die "run me as root (sudo $0 $all_args), or stage into a directory with --destdir DIR (or DESTDIR=DIR)"
  command -v "$nginx_bin" >/dev/null ||
    die "nginx is not installed: apt-get install nginx (lightrelay is meant to sit behind it)"
  [[ -d /run/systemd/system ]] ||
    die "systemd is not running on this host (no /run/systemd/system); the units need it"
fi
for name in lightrelay-publish lightrelay-subscribe; do
  [[ -x $bin_dir/$name ]] ||
    die "no $bin_dir/$name: build it first (cargo build --release) or pass --bin-dir DIR"
done

say() { printf '%s\n' "$*"; }
# Run a command, or only show it with --dry-run.
run() {
  say "+ $*"
  [[ $dry_run == 1 ]] || "$@"
}

# Install SRC as DEST (under DESTDIR) with MODE, through an optional sed script.
# kind=program|unit: always replaced; kind=config: replaced while it is as shipped, else kept
# (the shipped one goes next to it as DEST.new), as dpkg does with a conffile you edited.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
put() {
  local kind=$1 src=$2 dest=$3 mode=$4 script=${5:-}
  local target=$destdir$dest staged=$src
  if [[ -n $script ]]; then
    staged=$work/staged
    sed -e "$script" "$src" >"$staged"
  fi
  if [[ -e $target ]] && cmp -s "$staged" "$target"; then
    say "= $dest (unchanged)"
    return
  fi
  # A config file still as shipped (before this run's substitutions) is not an edit.
  if [[ $kind == config && -e $target ]] && ! cmp -s "$src" "$target"; then
    say "! $dest was edited here: kept; the shipped version goes to $dest.new"
    target=$target.new
  fi
  say "+ install -D -m $mode $src $target${script:+ (with sed '$script')}"
  [[ $dry_run == 1 ]] || install -D -m "$mode" "$staged" "$target"
}

say "lightrelay install: binaries from $bin_dir to $prefix/bin${destdir:+, staged under $destdir}"
[[ $dry_run == 1 ]] && say "(dry run: nothing is changed)"

# --- binaries -----------------------------------------------------------------------------------
for name in lightrelay-publish lightrelay-subscribe lightrelay; do
  if [[ -x $bin_dir/$name ]]; then
    put program "$bin_dir/$name" "$prefix/bin/$name" 0755
  fi
done

# --- systemd units ------------------------------------------------------------------------------
units=(lightrelay-publish.service lightrelay-subscribe.service)
for unit in lightrelay-publish.service lightrelay-subscribe.service \
  lightrelay-publish@.service lightrelay-subscribe@.service; do
  put unit "$here/systemd/$unit" "/etc/systemd/system/$unit" 0644 \
    "s|^ExecStart=/usr/bin/|ExecStart=$prefix/bin/|"
done

# --- settings -----------------------------------------------------------------------------------
put config "$here/deploy/lightrelay.default" /etc/default/lightrelay 0644

# --- the token secret (SPEC §8) -----------------------------------------------------------------
# 32 random bytes, base64: the HS256 secret that /etc/default/lightrelay's LIGHTRELAY_AUTH=publish
# needs and the units hand the servers as a credential. Made once, never replaced (tokens minted
# with it keep working); root's alone. Written under a temporary name and linked into place, so
# it is whole or absent, and a secret that appeared meanwhile is not overwritten.
make_secret() {
  local dest=/etc/lightrelay/jwt-secret
  local target=$destdir$dest
  if [[ -e $target ]]; then
    say "= $dest (kept: never replaced)"
    return
  fi
  say "+ make $target: 32 random bytes from /dev/urandom, base64, mode 0600, owner root"
  [[ $dry_run == 1 ]] && return
  install -d -m 0755 "$destdir/etc/lightrelay"
  local tmp
  tmp=$(mktemp "$destdir/etc/lightrelay/.jwt-secret.XXXXXX")
  {
    printf '%s\n' "# lightrelay HS256 secret (LIGHTRELAY_JWT_SECRET_FILE): one per line, SECRET or"
    printf '%s\n' "# LABEL:SECRET. Mint tokens: lightrelay token --secret-file $dest --pub '/x/*'"
    head -c 32 /dev/urandom | base64 -w0
    printf '\n'
  } >"$tmp"
  chmod 0600 "$tmp"
  if [[ $(id -u) == 0 ]]; then
    chown root:root "$tmp"
  else
    say "- not root: $dest belongs to $(id -un) in the staged root; chown it to root on the target"
  fi
  if ! ln "$tmp" "$target" 2>/dev/null; then
    say "= $dest (appeared meanwhile: kept)"
  fi
  rm -f "$tmp"
}
make_secret

# --- nginx --------------------------------------------------------------------------------------
put config "$here/nginx/lightrelay-upstreams.conf" /etc/nginx/conf.d/lightrelay-upstreams.conf 0644
put config "$here/nginx/lightrelay.conf" /etc/nginx/sites-available/lightrelay 0644
put config "$here/nginx/lightrelay-tls.conf" /etc/nginx/sites-available/lightrelay-tls 0644 \
  "${domain:+s/lightrelay\\.example\\.com/$domain/g}"

# Enable a site: a relative symlink, as Debian's own default site is.
enable_site() {
  local link=$destdir/etc/nginx/sites-enabled/$1
  if [[ -L $link ]]; then
    say "= /etc/nginx/sites-enabled/$1 (enabled)"
  else
    run mkdir -p "$destdir/etc/nginx/sites-enabled"
    run ln -s "../sites-available/$1" "$link"
  fi
}
enable_site lightrelay
if [[ -n $domain && -e $destdir/etc/letsencrypt/live/$domain/fullchain.pem ]]; then
  enable_site lightrelay-tls
  tls_enabled=1
else
  tls_enabled=0
fi

# --- enable, start, reload ----------------------------------------------------------------------
if [[ -n $destdir ]]; then
  if command -v systemctl >/dev/null; then
    run systemctl --root="$destdir" --quiet enable "${units[@]}"
  else
    say "- no systemctl here: enable ${units[*]} on the target"
  fi
  say "staged under $destdir: nothing started, nginx not reloaded"
else
  run systemctl daemon-reload
  run systemctl --quiet enable "${units[@]}"
  if [[ $start == 1 ]]; then
    # restart, not start: a second run picks up new binaries and units.
    run systemctl restart "${units[@]}"
    run "$nginx_bin" -t -q
    run systemctl reload-or-restart nginx
  else
    say "- --no-start: start with: systemctl start ${units[*]}; nginx -t && systemctl reload nginx"
  fi
fi

say ""
say "done. Next:"
say "  settings:  /etc/default/lightrelay, then systemctl restart ${units[*]}"
say "  tokens:    lightrelay token --secret-file /etc/lightrelay/jwt-secret --pub '/sensors/*' --ttl 365d"
say "  check:     curl -s http://127.0.0.1:8766/healthz; curl -s http://127.0.0.1:8768/healthz"
if [[ $tls_enabled == 0 ]]; then
  say "  TLS:       certbot certonly --webroot -w /var/www/html -d HOST, then"
  say "             $0 --domain HOST (enables sites-available/lightrelay-tls)"
fi
