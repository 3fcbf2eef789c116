#!/bin/sh
# nohup for the guest (Debian's busybox-static has no nohup applet)
if [ $# -eq 0 ]; then echo "usage: nohup COMMAND [ARG]..." >&2; exit 125; fi
trap '' HUP
if [ -t 1 ]; then exec >>nohup.out; fi
if [ -t 2 ]; then exec 2>&1; fi
exec "$@"
