#!/bin/sh
# A fake OCI runtime with runc's command line, for the shim's tests without VMs or
# containers. `create` starts `sh BUNDLE/cmd` in the background (held until `start`),
# writes its pid and exits, as runc does; `exec` runs the process spec's "fake" field
# with `sh -c`. BUNDLE/fail makes `create` fail with that message in the JSON log.
# Every call is appended to ROOT/calls.
root= log=
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --log-format) shift 2 ;;
    *) break ;;
  esac
done
verb=$1; shift
fail() {
  printf '{"level":"info","msg":"about to fail"}\n{"level":"error","msg":"%s","time":"2024-01-01T00:00:00Z"}\n' "$1" >> "$log"
  echo "fake runtime: $1" >&2
  exit 1
}
mkdir -p "$root"
echo "$verb $*" >> "$root/calls"
opts() { # sets bundle, pidfile, process from the flags; id is what is left
  while [ $# -gt 1 ]; do
    case "$1" in
      --bundle) bundle=$2; shift 2 ;;
      --pid-file) pidfile=$2; shift 2 ;;
      --process) process=$2; shift 2 ;;
      --console-socket) shift 2 ;;
      *) shift ;;
    esac
  done
  id=$1
}
case "$verb" in
create)
  opts "$@"
  [ -e "$bundle/fail" ] && fail "$(cat "$bundle/fail")"
  [ -e "$root/$id" ] && fail "container $id exists"
  mkdir "$root/$id"
  # Through fd 3: an asynchronous list's stdin is /dev/null before its own redirections.
  exec 3<&0
  (while [ ! -e "$root/$id/started" ]; do sleep 0.02; done; exec sh "$bundle/cmd") <&3 3<&- &
  echo $! > "$root/$id/pid"
  printf %s $! > "$pidfile"
  ;;
start)
  id=$1
  [ -d "$root/$id" ] || fail "container $id does not exist"
  touch "$root/$id/started"
  ;;
exec)
  opts "$@"
  [ -d "$root/$id" ] || fail "container $id does not exist"
  cmd=$(sed -n 's/.*"fake": *"\([^"]*\)".*/\1/p' "$process")
  exec 3<&0
  (exec sh -c "$cmd") <&3 3<&- &
  printf %s $! > "$pidfile"
  ;;
kill)
  [ "$1" = --all ] && shift
  id=$1
  [ -d "$root/$id" ] || fail "container $id does not exist"
  kill -"$2" "$(cat "$root/$id/pid")" 2>/dev/null || fail "container $id is not running"
  ;;
delete)
  force=
  [ "$1" = --force ] && { force=1; shift; }
  id=$1
  [ -d "$root/$id" ] || fail "container $id does not exist"
  [ -n "$force" ] && kill -9 "$(cat "$root/$id/pid")" 2>/dev/null
  rm -rf "${root:?}/$id"
  ;;
state)
  id=$1
  [ -d "$root/$id" ] || fail "container $id does not exist"
  printf '{"ociVersion":"1.0.2","id":"%s","status":"running","pid":%s,"bundle":"/"}\n' "$id" "$(cat "$root/$id/pid")"
  ;;
ps)
  id=$3
  [ -d "$root/$id" ] || fail "container $id does not exist"
  printf '[%s]\n' "$(cat "$root/$id/pid")"
  ;;
pause) kill -STOP "$(cat "$root/$1/pid")" ;;
resume) kill -CONT "$(cat "$root/$1/pid")" ;;
*) fail "unknown verb $verb" ;;
esac
