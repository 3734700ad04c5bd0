#!/usr/bin/env bash
# Runs in a user namespace of its own (unshare --user --map-root-user --mount), where it may mount
# a tmpfs over FOLDER, leave one file in it and remount it read-only: a real read-only file
# system, with no privileges on the machine. Usage: FOLDER COMMAND... Writes the command's exit
# status and stderr to FOLDER.rc and FOLDER.err, and what FOLDER holds afterwards to FOLDER.kept.
set -u
folder="$1"; shift
mkdir -p "$folder"
mount -t tmpfs -o size=1m tmpfs "$folder" || exit 90
echo kept > "$folder/before"
mount -o remount,ro "$folder" || exit 92
"$@" > /dev/null 2> "$folder.err"; echo $? > "$folder.rc"
ls -A "$folder" > "$folder.kept"
