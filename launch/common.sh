# shellcheck shell=bash
# Sourced by the launch/ and slurm/ scripts. Messages go to stderr, prefixed with the
# script's name (FA_HVD_SCRIPT, else $0's); commands are printed so that the line can be
# pasted into a shell as it is.
SCRIPT_NAME="${FA_HVD_SCRIPT:-$(basename "$0")}"

say() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }

# die MESSAGE: one error line, exit status 2 (bad input).
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 2; }

# show CMD ARGS...: print "[<script>] + CMD ARGS" without running it; an argument with
# characters a shell would take apart is quoted.
show() {
  local arg line="[$SCRIPT_NAME] +"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then line+=" $arg"; else line+=" $(printf '%q' "$arg")"; fi
  done
  printf '%s\n' "$line" >&2
}

# count NAME VALUE: exit with an error unless VALUE is a whole number >= 1.
count() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number >= 1, got '$2'"; }

# need COMMAND: exit with an error unless COMMAND is on PATH.
need() {
  command -v "$1" >/dev/null || die "$1 not found on PATH: activate the environment fa_hvd is installed in (in this repository: 'make setup', then 'source .venv/bin/activate')"
}

# run CMD ARGS...: print it, then run it.
run() { show "$@"; "$@"; }

# load_modules "NAME ...": `module load` them (environment modules / Lmod); nothing when empty.
load_modules() {
  [ -n "$1" ] || return 0
  command -v module >/dev/null || die "modules '$1' wanted, but this shell has no 'module' command (try '#!/bin/bash -l' as the first line)"
  # shellcheck disable=SC2086  # a list of module names
  run module load $1
}
