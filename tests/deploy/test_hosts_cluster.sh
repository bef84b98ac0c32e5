#!/usr/bin/env bash
# test_hosts_cluster.sh - a kvrelay cluster across emulated hosts (emuhosts.sh): one MPI job
# whose ranks run on five "machines" (network namespaces with their own hostname and
# address on a bridge), started by mpirun through an rsh agent as ssh would, MPI over TCP
# between hosts, the client on the machine itself talking gRPC to the coordinator's
# address on the bridge.
#
#   h1 coordinator (and mpirun)   h2, h3 prefill   h4, h5 decode
#
#   test_hosts_cluster.sh BIN_DIR TEST_BIN_DIR [SCENARIO]
#   golden   16 concurrent `kvrelay submit` streams return the llama2.c golden texts; the
#            nodes report their own hosts; MPI traffic crossed the links; SIGTERM to mpirun
#            stops every process on every host.
#   unplug-decode, unplug-prefill
#            the same 16 streams, and the cable of a decode (prefill) host is pulled
#            (`ip link set ... down` on its switch port) once every stream is running:
#            every stream still returns its exact text, the host is reported dead, the
#            cluster keeps serving; plugged back in, the job shuts down cleanly.
#            unplug-prefill: the 16 streams are past their prefill when the cable goes, so
#            8 more prompts are sent right after it: until the coordinator notices (its
#            --node-timeout, 3 s) it still places some on the silent host, and those must be
#            re-run on the other prefill host. Both scenarios check that the coordinator did
#            re-run requests of the unplugged host's rank (so the fault was really hit).
# Exit 0 pass, 1 fail, 77 skip (the machine cannot make namespaces: the reason is printed).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EMU=$HERE/emuhosts.sh
BIN=$(cd "${1:?BIN_DIR}" && pwd)
TBIN=$(cd "${2:?TEST_BIN_DIR}" && pwd)
SCENARIO=${3:-golden}
SHARED=${KVR_SHARED_DIR:-$HERE/../../../shared}
MODEL=$SHARED/models/stories260K.bin
TOKENIZER=$SHARED/models/tok512.bin
PORT=50051 # inside h1's own network namespace: nothing else can hold it

if ! why=$("$EMU" check); then
    echo "SKIP: $why"
    exit 77
fi
command -v mpirun >/dev/null || { echo "SKIP: mpirun not installed"; exit 77; }

P="hc$$"
P=${P:0:11}
WORK=$(mktemp -d "/tmp/kvr-$P.XXXXXX")
MPIRUN_PID=""
export EMUHOSTS_OWNER=$$
cleanup() {
    local rc=$?
    if [ -n "$MPIRUN_PID" ] && kill -0 "$MPIRUN_PID" 2>/dev/null; then
        kill -TERM "$MPIRUN_PID" 2>/dev/null || true
    fi
    "$EMU" down "$P" || true
    if [ $rc -ne 0 ] && [ -f "$WORK/mpirun.log" ]; then
        echo "--- mpirun log (last 40 lines)"
        tail -n 40 "$WORK/mpirun.log"
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() { echo "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

"$EMU" up "$P" 5 >"$WORK/env"
set -a
. "$WORK/env"
set +a
H=("" "$HOST1" "$HOST2" "$HOST3" "$HOST4" "$HOST5")
ADDR="$IP1:$PORT"
echo "hosts: ${H[*]:1} on $SUBNET; coordinator at $ADDR"

# The step delay that keeps streams running while a host is struck is a test-only option:
# --debug-step-delay-ms of the product's nodes, or (once the fault-injection options moved
# to the test builds) --fault-step-delay-ms of the nodes built into TEST_BIN_DIR.
if grep -aq -- "fault-step-delay-ms" "$TBIN/kvrelay-decode" 2>/dev/null; then
    NODE_BIN=$TBIN STEP_DELAY=--fault-step-delay-ms
else
    NODE_BIN=$BIN STEP_DELAY=--debug-step-delay-ms
fi
DECODE_ARGS=""
# Unplugging a host mid-stream needs streams that last: a few ms per decode step.
case "$SCENARIO" in unplug-*) DECODE_ARGS="$STEP_DELAY 3" ;; esac

# One MPMD job, mapped by host. The MCA settings (OMPI_MCA_* from emuhosts' env): the rsh
# agent, btl tcp,self, both TCP components restricted to the cluster subnet, pml ob1.
t0=$(now)
"$EMU" exec "$P" h1 env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    mpirun --enable-recovery --bind-to none --oversubscribe \
    -np 1 -host "${H[1]}" "$NODE_BIN/kvrelay-coordinator" --model "$MODEL" --tokenizer "$TOKENIZER" \
    --listen "0.0.0.0:$PORT" --node-timeout 3 \
    : -np 1 -host "${H[2]}" "$NODE_BIN/kvrelay-prefill" --model "$MODEL" --threads 1 \
    : -np 1 -host "${H[3]}" "$NODE_BIN/kvrelay-prefill" --model "$MODEL" --threads 1 \
    : -np 1 -host "${H[4]}" "$NODE_BIN/kvrelay-decode" --model "$MODEL" --threads 1 --kv-memory 64MiB $DECODE_ARGS \
    : -np 1 -host "${H[5]}" "$NODE_BIN/kvrelay-decode" --model "$MODEL" --threads 1 --kv-memory 64MiB $DECODE_ARGS \
    >"$WORK/mpirun.log" 2>&1 &
MPIRUN_PID=$!

# Ready when the coordinator answers ClusterStatus (it serves only once every node said
# HELLO) and reports all four nodes alive.
for _ in $(seq 1 600); do
    kill -0 "$MPIRUN_PID" 2>/dev/null || fail "mpirun exited before the cluster was ready"
    if "$BIN/kvrelay" status --addr "$ADDR" --timeout 2 --json >"$WORK/status.json" 2>/dev/null &&
        [ "$(grep -o '"alive":true' "$WORK/status.json" | wc -l)" -eq 4 ]; then
        break
    fi
    sleep 0.1
done
[ -s "$WORK/status.json" ] || fail "the cluster did not become ready in 60 s"
echo "cluster ready in $(elapsed "$t0") s"
# Each node reports the hostname it runs on: the hosts are distinct machines to MPI.
for i in 2 3 4 5; do
    grep -q "\"host\":\"${H[$i]}\"" "$WORK/status.json" || fail "no node reports host ${H[$i]}: $(cat "$WORK/status.json")"
done

rx_bytes() { cat "/sys/class/net/${PREFIX}v$1/statistics/rx_bytes"; } # bytes sent BY host $1
declare -a before
for i in 1 2 3 4 5; do before[$i]=$(rx_bytes "$i"); done

case "$SCENARIO" in
golden)
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 ||
        fail "not every stream returned its golden text"
    ;;
unplug-decode | unplug-prefill)
    # A host's cable is pulled while 16 streams run: its ranks go silent (no error: TCP
    # just stops), the coordinator declares them dead after --node-timeout and re-runs
    # their requests on the other host of that role; every stream must still be exact.
    case "$SCENARIO" in unplug-decode) VICTIM=4 ;; *) VICTIM=2 ;; esac
    rm -f "$WORK/ready"
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 \
        --ready-file "$WORK/ready" >"$WORK/streams.log" 2>&1 &
    GS=$!
    for _ in $(seq 1 600); do [ -e "$WORK/ready" ] && break; kill -0 $GS 2>/dev/null || break; sleep 0.05; done
    [ -e "$WORK/ready" ] || { cat "$WORK/streams.log"; fail "the streams never all started"; }
    t2=$(now)
    "$EMU" link "$P" "h$VICTIM" down
    echo "unplugged ${H[$VICTIM]} mid-stream"
    if [ "$SCENARIO" = unplug-prefill ]; then
        "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 8 --timeout 120 \
            >"$WORK/wave2.log" 2>&1 || { cat "$WORK/wave2.log"; fail "prompts sent after ${H[$VICTIM]} was unplugged were lost"; }
        tail -n 1 "$WORK/wave2.log"
    fi
    wait $GS || { cat "$WORK/streams.log"; fail "streams lost when ${H[$VICTIM]} was unplugged"; }
    tail -n 1 "$WORK/streams.log"
    # Ranks follow the MPMD order: h1 is rank 0, hN rank N-1.
    reruns=$(grep -c "re-run (attempt [0-9]*) after [a-z]* node rank $((VICTIM - 1)) died" "$WORK/mpirun.log" || true)
    [ "$reruns" -gt 0 ] || fail "no request of ${H[$VICTIM]} (rank $((VICTIM - 1))) was re-run: the unplug hit nothing"
    echo "$reruns requests of ${H[$VICTIM]} re-run elsewhere"
    echo "every stream exact, $(elapsed "$t2") s after the unplug"
    # Declared dead once silent for --node-timeout (3 s) after the unplug.
    for _ in $(seq 1 150); do
        "$BIN/kvrelay" status --addr "$ADDR" --timeout 5 --json >"$WORK/status.json" || fail "status after the unplug"
        grep -q "\"host\":\"${H[$VICTIM]}\",\"alive\":false" "$WORK/status.json" && break
        sleep 0.1
    done
    grep -q "\"host\":\"${H[$VICTIM]}\",\"alive\":false" "$WORK/status.json" ||
        fail "${H[$VICTIM]} not reported dead: $(cat "$WORK/status.json")"
    # The cluster keeps serving on what is left.
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 8 --timeout 60 ||
        fail "the cluster stopped serving after ${H[$VICTIM]} was unplugged"
    # Plugged back in (a transient fault): the job's runtime reaches every host again,
    # so the shutdown below must be as clean as ever.
    "$EMU" link "$P" "h$VICTIM" up
    ;;
*)
    fail "unknown scenario $SCENARIO"
    ;;
esac

# KV blocks went from the prefill hosts and tokens from the decode hosts over the links.
for i in 2 3 4 5; do
    sent=$(( $(rx_bytes "$i") - before[i] ))
    [ "$sent" -gt 1000 ] || fail "host ${H[$i]} sent only $sent bytes during the run"
    echo "host ${H[$i]} sent $sent bytes"
done

# Shutdown: SIGTERM to mpirun reaches every rank on every host; nothing may be left.
t1=$(now)
kill -TERM "$MPIRUN_PID"
for _ in $(seq 1 300); do
    kill -0 "$MPIRUN_PID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$MPIRUN_PID" 2>/dev/null && fail "mpirun still running 30 s after SIGTERM"
wait "$MPIRUN_PID" || true
MPIRUN_PID=""
left=$("$EMU" pids "$P" | tr '\n' ' ')
[ -z "$left" ] || fail "processes left on the hosts after mpirun exited: $(ps -o pid=,args= -p ${left// /,} 2>/dev/null)"
echo "stopped in $(elapsed "$t1") s, no process left on any host"
echo "PASS ($SCENARIO)"
