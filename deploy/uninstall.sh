#!/usr/bin/env bash
# Remove what deploy/install.sh installed: stop and disable the units (template instances
# included), remove the binaries, units and nginx sites (and every sites-enabled link to them,
# whatever its name), and reload nginx.
# /etc/default/lightrelay and the token secret /etc/lightrelay/jwt-secret are kept unless --purge.
#
# Options:
#   --dry-run       print what would be done, change nothing
#   --prefix DIR    where the binaries were installed: DIR/bin (default /usr/local)
#   --destdir DIR   remove from a staged root instead of / (also: DESTDIR=DIR)
#   --purge         also remove /etc/default/lightrelay{,-publish,-subscribe}, the units'
#                   `systemctl edit` drop-ins and /etc/lightrelay/jwt-secret (tokens minted
#                   with it stop working)
#   -h, --help      this text
set -euo pipefail

all_args="$*"
dry_run=0
prefix=/usr/local
destdir=${DESTDIR:-}
purge=0
nginx_bin=${NGINX:-nginx}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "uninstall.sh: $*" >&2
  exit 1
}

while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
    --prefix=*) prefix=${1#*=} ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift ;;
    --destdir=*) destdir=${1#*=} ;;
    --purge) purge=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
[[ $prefix == /* ]] || die "--prefix must be an absolute path, not $prefix"
[[ -z $destdir || $destdir == /* ]] || destdir=$PWD/$destdir
destdir=${destdir%/}
if [[ -z $destdir && $(id -u) != 0 ]]; then
  die "run me as root (sudo $0 $all_args), or name a staged root with --destdir DIR"
fi

say() { printf '%s\n' "$*"; }
run() {
  say "+ $*"
  [[ $dry_run == 1 ]] || "$@"
}
remove() {
  local path=$destdir$1
  if [[ -e $path || -L $path ]]; then
    run rm -f "$path"
  fi
}

[[ $dry_run == 1 ]] && say "(dry run: nothing is changed)"
units=(lightrelay-publish.service lightrelay-subscribe.service)
# Enabled template instances (lightrelay-subscribe@8777.service, …), found by their symlinks.
shopt -s nullglob
for link in "$destdir"/etc/systemd/system/*.wants/lightrelay-{publish,subscribe}@?*.service; do
  name=${link##*/}
  [[ " ${units[*]} " == *" $name "* ]] || units+=("$name")
done
shopt -u nullglob

systemd_up=0
[[ -z $destdir && -d /run/systemd/system ]] && systemd_up=1
if [[ $systemd_up == 1 ]]; then
  run systemctl stop "${units[@]}" 'lightrelay-publish@*.service' 'lightrelay-subscribe@*.service' || true
  run systemctl --quiet disable "${units[@]}" || true
elif command -v systemctl >/dev/null; then
  run systemctl ${destdir:+--root="$destdir"} --quiet disable "${units[@]}" || true
fi

for name in lightrelay-publish lightrelay-subscribe lightrelay; do
  remove "$prefix/bin/$name"
done
for unit in lightrelay-publish.service lightrelay-subscribe.service \
  lightrelay-publish@.service lightrelay-subscribe@.service; do
  remove "/etc/systemd/system/$unit"
done
# The sites' links in sites-enabled, whatever their names (the README's, install.sh's, or the
# admin's own): left behind they would dangle and fail `nginx -t`.
shopt -s nullglob
for link in "$destdir"/etc/nginx/sites-enabled/*; do
  [[ -L $link ]] || continue
  case $(readlink "$link") in
    */sites-available/lightrelay | */sites-available/lightrelay-tls | \
      sites-available/lightrelay | sites-available/lightrelay-tls)
      remove "/etc/nginx/sites-enabled/${link##*/}"
      ;;
  esac
done
shopt -u nullglob
for file in sites-available/lightrelay sites-available/lightrelay-tls \
  sites-available/lightrelay.new sites-available/lightrelay-tls.new \
  conf.d/lightrelay-upstreams.conf conf.d/lightrelay-upstreams.conf.new; do
  remove "/etc/nginx/$file"
done
if [[ $purge == 1 ]]; then
  for file in lightrelay lightrelay.new lightrelay-publish lightrelay-subscribe; do
    remove "/etc/default/$file"
  done
  # `systemctl edit` drop-ins for the units.
  for unit in lightrelay-publish lightrelay-subscribe lightrelay-publish@ lightrelay-subscribe@; do
    remove "/etc/systemd/system/$unit.service.d/override.conf"
    if [[ -d $destdir/etc/systemd/system/$unit.service.d ]]; then
      run rmdir --ignore-fail-on-non-empty "$destdir/etc/systemd/system/$unit.service.d"
    fi
  done
  remove /etc/lightrelay/jwt-secret
  if [[ -d $destdir/etc/lightrelay ]]; then
    run rmdir --ignore-fail-on-non-empty "$destdir/etc/lightrelay"
  fi
else
  say "- kept /etc/default/lightrelay and /etc/lightrelay/jwt-secret (--purge removes them)"
fi

if [[ $systemd_up == 1 ]]; then
  run systemctl daemon-reload
  if command -v "$nginx_bin" >/dev/null && systemctl --quiet is-active nginx; then
    run "$nginx_bin" -t -q
    run systemctl reload nginx
  fi
fi
say "lightrelay removed${destdir:+ from $destdir}"
