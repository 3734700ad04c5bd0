#!/usr/bin/env bash
# Runs in a user namespace of its own (unshare --user --map-root-user --mount), where it may mount
# a small tmpfs over WORKDIR/checkpoints: a real file system that really fills up or turns
# read-only, with no privileges on the machine. Usage: FAULT WORKDIR COMMAND... (the ctx.train
# command without --config.train.num_steps). FAULT: full (the disk fills after checkpoint 4,
# then is freed) or read_only (remounted read-only after checkpoint 4, then writable again).
# Writes refused.rc, refused.err, kept (the step folders left after the refused run),
# resumed.rc and resumed.out into WORKDIR.
set -u
fault="$1" workdir="$2"; shift 2
mkdir -p "$workdir/checkpoints"
mount -t tmpfs -o size=16m tmpfs "$workdir/checkpoints" || exit 90
"$@" --config.train.num_steps=4 > "$workdir/first.out" 2>&1 || exit 91
case "$fault" in
  full) dd if=/dev/zero of="$workdir/checkpoints/filler" bs=4k 2>/dev/null ;;  # until ENOSPC
  read_only) mount -o remount,ro "$workdir/checkpoints" || exit 92 ;;
esac
"$@" --config.train.num_steps=12 > /dev/null 2> "$workdir/refused.err"; echo $? > "$workdir/refused.rc"
ls "$workdir/checkpoints" | grep -E '^[0-9]+$' > "$workdir/kept"
case "$fault" in
  full) rm "$workdir/checkpoints/filler" ;;
  read_only) mount -o remount,rw "$workdir/checkpoints" ;;
esac
"$@" --config.train.num_steps=12 > "$workdir/resumed.out" 2>&1; echo $? > "$workdir/resumed.rc"
