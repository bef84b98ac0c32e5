#!/usr/bin/env bash
# test_slurm.sh - deploy/slurm/kvrelay.sbatch under a real Slurm (Debian's 22.05) started
# by this test: munged, slurmctld and one slurmd per emulated host (emuhosts.sh: each host
# its own network namespace, hostname and address), config, state, logs and sockets under
# a temporary directory. The test is the login node: it submits from the machine itself,
# which reaches the hosts over the bridge.
#
#   h1: slurmctld + slurmd   h2, h3, h4: slurmd        (one node each; 4-node allocation)
#
# For each launch mode of the script (KVR_LAUNCH=mpirun, srun):
#   sbatch --nodes=4 --ntasks=4 deploy/slurm/kvrelay.sbatch (1 coordinator, 1 prefill,
#   2 decode, one rank per node), wait until the coordinator serves, 16 concurrent golden
#   `kvrelay submit` streams; then a decode rank is SIGKILLed while 16 streams are running:
#   every stream still returns its exact golden text (the coordinator re-runs the dead
#   node's requests on the other one), the job keeps running and serving; then `scancel`,
#   and no process of the job may be left on any host.
# (srun with two ranks on one node behaves differently: Slurm's PMIx plugin kills the
# step when one of them dies; measured by hand, documented in deploy/README.md.)
# Mode "join" (the elastic decode pool, issue 14): the cluster job (1 prefill, 1 decode)
#   with KVR_JOIN_DIR on ONE node (all its ranks under its mpirun: with ranks on other
#   nodes, Open MPI 4.1.4's cross-job connect fails, deploy/README.md; KVR_TEST_JOIN_LAYOUT
#   ="--nodes=3 --ntasks=3" with KVR_JOIN_ANY_LAYOUT=1 reproduces that), then deploy/slurm/kvrelay-decode-join.sbatch
#   as a second job on another node: it joins (2 serving decode nodes in `kvrelay status --json`),
#   serves golden streams (some on its rank, above the cluster job's), then leaves on
#   `scancel --batch --signal=USR1` while it runs streams: every stream exact, the join job
#   COMPLETED with exit 0, the node gone from the pool, the cluster still serving; then
#   `scancel` of the cluster, and no process left on any host.
#   test_slurm.sh BIN_DIR TEST_BIN_DIR [MODES]      (MODES: "mpirun srun", the default; "join")
# Exit 0 pass, 1 fail, 77 skip (no Slurm/munge installed, or no namespaces: reason printed).
set -euo pipefail
# Open MPI refuses root unless told (CI runs as root); sbatch passes the environment on.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
EMU=$HERE/emuhosts.sh
BIN=$(cd "${1:?BIN_DIR}" && pwd)
TBIN=$(cd "${2:?TEST_BIN_DIR}" && pwd)
MODES=${3:-mpirun srun}
SHARED=${KVR_SHARED_DIR:-$SRC/../shared}
PORT=50051 # inside the first node's own namespace

for c in slurmctld slurmd sbatch squeue scancel munged; do
    command -v $c >/dev/null || { echo "SKIP: $c not installed (scripts/install-deploy-deps.sh installs Slurm and munge)"; exit 77; }
done
case " $MODES " in
*" join "*) command -v ompi-server >/dev/null || { echo "SKIP: no ompi-server on PATH (Open MPI 4.1's openmpi-bin has it; Open MPI 5 has none): mode join needs it"; exit 77; } ;;
esac
if ! why=$("$EMU" check); then
    echo "SKIP: $why"
    exit 77
fi

P="sl$$"
P=${P:0:11}
# Not under /tmp: every emulated host has its own /tmp; the daemons need this directory.
W=$(mktemp -d "/var/tmp/kvr-$P.XXXXXX")
export EMUHOSTS_OWNER=$$
DAEMONS=()
cleanup() {
    local rc=$?
    if [ -f "$W/slurm.conf" ]; then
        SLURM_CONF=$W/slurm.conf timeout 10 scancel --quiet --full "--partition=kvr" 2>/dev/null || true
    fi
    for pid in "${DAEMONS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    [ -f "$W/munged.pid" ] && kill -TERM "$(cat "$W/munged.pid")" 2>/dev/null || true
    "$EMU" down "$P" || true
    if [ $rc -ne 0 ]; then
        for f in "$W"/*.log "$W"/*.out; do
            [ -f "$f" ] || continue
            echo "--- $f (last 25 lines)"
            tail -n 25 "$f"
        done
    fi
    # KVR_DEPLOY_KEEP_LOGS=DIR keeps the daemons' and the jobs' logs (for debugging).
    [ -n "${KVR_DEPLOY_KEEP_LOGS:-}" ] && mkdir -p "$KVR_DEPLOY_KEEP_LOGS" && cp "$W"/*.log "$W"/*.out "$KVR_DEPLOY_KEEP_LOGS"/ 2>/dev/null
    rm -rf "$W"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() { echo "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
# wait_for SECONDS DESCRIPTION CMD...: polls CMD every 0.1 s.
wait_for() {
    local limit=$1 what=$2 t
    shift 2
    t=$(now)
    until "$@"; do
        awk -v a="$t" -v b="$(now)" -v l="$limit" 'BEGIN{exit !(b-a > l)}' && fail "$what: not within $limit s"
        sleep 0.1
    done
}

"$EMU" up "$P" 4 >"$W/env"
. "$W/env" # not exported: its OMPI_MCA_* (rsh agent) must not reach sbatch
H=("" "$HOST1" "$HOST2" "$HOST3" "$HOST4")
IPS=("" "$IP1" "$IP2" "$IP3" "$IP4")

# ---- munge: one daemon, its socket on the shared filesystem (every host sees it) -------
mkdir -p "$W/state"
dd if=/dev/urandom of="$W/munge.key" bs=1 count=1024 status=none
chmod 400 "$W/munge.key"
munged -f --key-file="$W/munge.key" --socket="$W/munge.sock" --pid-file="$W/munged.pid" \
    --log-file="$W/munged.log" --seed-file="$W/munge.seed"
wait_for 10 "munged socket" test -S "$W/munge.sock"

# ---- slurm.conf: the lines that matter without systemd and cgroups (notes/deploy.md) -----
cat >"$W/slurm.conf" <<EOF
ClusterName=kvr$P
SlurmctldHost=${H[1]}(${IPS[1]})
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
AuthInfo=socket=$W/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$W/state
SlurmdSpoolDir=/tmp/kvr-slurmd
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.%n.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
MessageTimeout=10
InactiveLimit=0
EOF
for i in 1 2 3 4; do
    echo "NodeName=${H[$i]} NodeHostname=${H[$i]} NodeAddr=${IPS[$i]} CPUs=2 RealMemory=2000 State=UNKNOWN" >>"$W/slurm.conf"
done
echo "PartitionName=kvr Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$W/slurm.conf"
export SLURM_CONF=$W/slurm.conf

t0=$(now)
"$EMU" exec "$P" h1 slurmctld -D -i >"$W/slurmctld.out" 2>&1 &
DAEMONS+=($!)
for i in 1 2 3 4; do
    "$EMU" exec "$P" "h$i" sh -c 'mkdir -p /tmp/kvr-slurmd && exec slurmd -D -N "$0"' "${H[$i]}" \
        >"$W/slurmd.${H[$i]}.out" 2>&1 &
    DAEMONS+=($!)
done
nodes_idle() { [ "$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)" -eq 4 ]; }
wait_for 60 "four idle Slurm nodes" nodes_idle
echo "Slurm up in $(elapsed "$t0") s: $(sinfo -h -o '%D nodes %T %N')"

job_state() { squeue -h -j "$1" -o '%T' 2>/dev/null; }
job_gone() { local s; s=$(job_state "$1"); [ -z "$s" ] || [ "$s" = COMPLETED ] || [ "$s" = CANCELLED ] || [ "$s" = FAILED ]; }
node_pids() { # host, program: its pids on that host
    local p
    for p in $("$EMU" pids "$P" "$1"); do
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && echo "$p"
    done
    return 0
}
# Every process on the hosts that is not a Slurm daemon: job steps, mpirun, orted, ranks.
job_leftovers() {
    local p c out=""
    for p in $("$EMU" pids "$P"); do
        c=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        case "$c" in slurmctld | slurmscriptd | slurmd) ;; *) out="$out $p:$c" ;; esac
    done
    echo "$out"
}
no_leftovers() { [ -z "$(job_leftovers)" ]; }

# The step delay that keeps streams running while a host is struck is a test-only option:
# --debug-step-delay-ms of the product's nodes, or (once the fault-injection options moved
# to the test builds) --fault-step-delay-ms of the nodes built into TEST_BIN_DIR.
if grep -aq -- "fault-step-delay-ms" "$TBIN/kvrelay-decode" 2>/dev/null; then
    NODE_BIN=$TBIN STEP_DELAY=--fault-step-delay-ms
else
    NODE_BIN=$BIN STEP_DELAY=--debug-step-delay-ms
fi
job_info() { scontrol -o show job "$1" 2>/dev/null; }
# decode_ranks STATE: the ranks of the decode nodes in that state in $W/status.json.
decode_ranks() {
    grep -o '{"rank":[0-9]*,"role":"decode"[^}]*"state":"'"$1"'"' "$W/status.json" |
        sed 's/^{"rank":\([0-9]*\).*/\1/'
}
run_join() {
    local t1 JOB JJOB FIRST FIRST_IP ADDR JR s
    t1=$(now)
    mkdir -p "$W/join"
    JOB=$(cd "$W" && KVR_BIN=$NODE_BIN KVR_MODEL=$SHARED/models/stories260K.bin \
        KVR_TOKENIZER=$SHARED/models/tok512.bin KVR_PREFILL=1 KVR_DECODE=1 KVR_PORT=$PORT \
        KVR_KV_MEMORY=64MiB KVR_COORD_ARGS="--node-timeout 3" KVR_THREADS=1 KVR_MPI_SUBNET=$SUBNET \
        KVR_JOIN_DIR=$W/join sbatch --parsable ${KVR_TEST_JOIN_LAYOUT:---nodes=1 --ntasks=3 --overcommit} --output="$W/job-%j.out" \
        "$SRC/deploy/slurm/kvrelay.sbatch")
    JOB=${JOB%%;*}
    echo "cluster job $JOB submitted (KVR_JOIN_DIR=$W/join)"
    running() {
        local s
        s=$(job_state "$1")
        case "$s" in
        RUNNING) return 0 ;;
        "" | COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL) fail "job $1 ended before it ran (${s:-gone})" ;;
        esac
        return 1
    }
    wait_for 60 "job $JOB running" running "$JOB"
    FIRST=$(squeue -h -j "$JOB" -o '%N' | xargs scontrol show hostnames | head -n1)
    FIRST_IP=$(awk -v h="$FIRST" '$2 == h {print $1}' "$STATE/hosts")
    ADDR="$FIRST_IP:$PORT"
    serving() {
        "$BIN/kvrelay" status --addr "$ADDR" --timeout 2 --json >"$W/status.json" 2>/dev/null &&
            [ "$(decode_ranks serving | wc -l)" -eq "$1" ]
    }
    wait_for 90 "coordinator of job $JOB serving at $ADDR" serving 1
    local OWN_MAX
    OWN_MAX=$(grep -o '"rank":[0-9]*' "$W/status.json" | sed 's/.*://' | sort -n | tail -n1)
    echo "serving at $ADDR $(elapsed "$t1") s after sbatch (ranks 0-$OWN_MAX)"

    # The second job: one decode node that joins. Its steps are slowed (test builds'
    # step delay) so that streams are still running on it when it is told to leave.
    local t2
    t2=$(now)
    JJOB=$(cd "$W" && KVR_BIN=$NODE_BIN KVR_MODEL=$SHARED/models/stories260K.bin KVR_KV_MEMORY=64MiB \
        KVR_THREADS=1 KVR_MPI_SUBNET=$SUBNET KVR_JOIN_DIR=$W/join KVR_DECODE_ARGS="$STEP_DELAY 10" \
        sbatch --parsable --nodes=1 --ntasks=1 --output="$W/join-%j.out" \
        "$SRC/deploy/slurm/kvrelay-decode-join.sbatch")
    JJOB=${JJOB%%;*}
    wait_for 60 "join job $JJOB running" running "$JJOB"
    local JNODE
    JNODE=$(squeue -h -j "$JJOB" -o '%N')
    joined() { running "$JJOB" && serving 2; }
    wait_for 60 "the node of job $JJOB serving beside the cluster's own" joined
    JR=$(decode_ranks serving | sort -n | tail -n1)
    [ "$JR" -gt "$OWN_MAX" ] || fail "no decode rank above $OWN_MAX serving: $(cat "$W/status.json")"
    grep -q "\"rank\":$JR,\"role\":\"decode\",\"host\":\"$JNODE\"" "$W/status.json" ||
        fail "rank $JR is not on the join job's node $JNODE: $(cat "$W/status.json")"
    echo "join job $JJOB: decode rank $JR serving $(elapsed "$t2") s after its sbatch"

    # Golden streams until one is served by the joined node (placement spreads them over
    # both; a few rounds at most).
    local round served=0
    for round in 1 2 3 4 5; do
        "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 8 --timeout 60 \
            --decode-ranks "$W/ranks" || fail "join: golden streams with the joined node"
        if grep -qx "$JR" "$W/ranks"; then served=1; break; fi
    done
    [ $served -eq 1 ] || fail "the joined node (rank $JR) served none of $round rounds of streams"
    echo "rank $JR served $(grep -cx "$JR" "$W/ranks") of the 8 streams of round $round"

    # Leave while streams run on it: the documented clean stop of the join job. Rounds of
    # 16 streams until one runs on the joined node when the status is polled (placement
    # may put none there, or they may end between two polls), then the stop.
    busy() {
        "$BIN/kvrelay" status --addr "$ADDR" --timeout 2 --json >"$W/status.json" 2>/dev/null &&
            grep -q "{\"rank\":$JR,\"role\":\"decode\"[^}]*\"running\":[1-9]" "$W/status.json"
    }
    # KVR_TEST_JOIN_STOP: other scancel options to try by hand (e.g. "--batch --signal=TERM").
    local STOP=${KVR_TEST_JOIN_STOP:---batch --signal=USR1} GS t3 stopped=0
    for round in 1 2 3 4 5 6 7 8; do
        "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 \
            --decode-ranks "$W/ranks" >"$W/leave.out" 2>&1 &
        GS=$!
        while kill -0 "$GS" 2>/dev/null; do
            if busy; then
                echo "scancel $STOP $JJOB (rank $JR busy, round $round)"
                t3=$(now)
                scancel $STOP "$JJOB"
                stopped=1
                break
            fi
            sleep 0.05
        done
        [ $stopped -eq 1 ] && break
        wait "$GS" || { cat "$W/leave.out"; fail "join: golden streams (round $round, before the leave)"; }
    done
    [ $stopped -eq 1 ] || fail "no stream seen running on rank $JR in $round rounds"
    wait_for 60 "join job $JJOB ended after scancel" job_gone "$JJOB"
    echo "join job $JJOB ended $(elapsed "$t3") s after scancel"
    wait "$GS" || { cat "$W/leave.out"; fail "join: streams lost when the joined node left"; }
    tail -n 1 "$W/leave.out"
    echo "rank $JR served $(grep -cx "$JR" "$W/ranks") of the 16 streams it was leaving under"
    s=$(job_info "$JJOB")
    echo "$s" | grep -q "JobState=COMPLETED" || fail "join job $JJOB not COMPLETED: $s"
    echo "$s" | grep -q "ExitCode=0:0" || fail "join job $JJOB did not exit 0: $s"
    grep -q "mpirun exited 0" "$W/join-$JJOB.out" || fail "join job's mpirun did not exit 0: $(cat "$W/join-$JJOB.out")"
    gone() {
        "$BIN/kvrelay" status --addr "$ADDR" --timeout 2 --json >"$W/status.json" 2>/dev/null &&
            [ "$(decode_ranks serving)" != "" ] && ! decode_ranks serving | grep -qx "$JR"
    }
    wait_for 30 "rank $JR out of the serving pool" gone
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 4 --timeout 60 --decode-ranks "$W/ranks" ||
        fail "join: the cluster stopped serving after the joined node left"
    ! grep -qx "$JR" "$W/ranks" || fail "a request went to rank $JR after it left"
    [ "$(job_state "$JOB")" = RUNNING ] || fail "join: the cluster job ended when the joined node left"
    host_leftovers() {
        local p c out=""
        for p in $("$EMU" pids "$P" "$1"); do
            c=$(cat "/proc/$p/comm" 2>/dev/null) || continue
            [ "$c" = slurmd ] || out="$out $p:$c"
        done
        echo "$out"
    }
    for _ in $(seq 1 100); do [ -z "$(host_leftovers "$JNODE")" ] && break; sleep 0.1; done
    [ -z "$(host_leftovers "$JNODE")" ] || fail "processes left on $JNODE 10 s after the join job ended:$(host_leftovers "$JNODE")"
    echo "scancel $JOB"
    local t4
    t4=$(now)
    scancel "$JOB"
    wait_for 60 "job $JOB gone after scancel" job_gone "$JOB"
    for _ in $(seq 1 300); do no_leftovers && break; sleep 0.1; done
    no_leftovers || fail "processes of job $JOB left on the hosts 30 s after it ended:$(job_leftovers)"
    [ -z "$(ls "$W/join" | grep -v '^ompi-server.uri$' || true)" ] || echo "note: left in the join directory: $(ls "$W/join")"
    echo "no process of job $JOB left on any host ($(elapsed "$t4") s after the end)"
}
for MODE in $MODES; do
    echo "=== launch mode: $MODE"
    if [ "$MODE" = join ]; then
        run_join
        continue
    fi
    t1=$(now)
    # Submits the job, waits until it runs and sets ADDR to its coordinator.
    submit() {
        JOB=$(cd "$W" && KVR_LAUNCH=$MODE KVR_BIN=$NODE_BIN KVR_MODEL=$SHARED/models/stories260K.bin \
            KVR_TOKENIZER=$SHARED/models/tok512.bin KVR_PREFILL=1 KVR_DECODE=2 KVR_PORT=$PORT \
            KVR_KV_MEMORY=64MiB KVR_COORD_ARGS="--node-timeout 3" KVR_DECODE_ARGS="$STEP_DELAY 3" \
            KVR_THREADS=1 KVR_MPI_SUBNET=$SUBNET \
            sbatch --parsable --nodes=4 --ntasks=4 --output="$W/job-%j.out" "$SRC/deploy/slurm/kvrelay.sbatch")
        JOB=${JOB%%;*}
        echo "job $JOB submitted"
        wait_for 60 "job $JOB running" running
        # The coordinator runs on the job's first node.
        FIRST=$(squeue -h -j "$JOB" -o '%N' | xargs scontrol show hostnames | head -n1)
        FIRST_IP=$(awk -v h="$FIRST" '$2 == h {print $1}' "$STATE/hosts")
        ADDR="$FIRST_IP:$PORT"
    }
    running() {
        local s
        s=$(job_state "$JOB")
        case "$s" in
        RUNNING) return 0 ;;
        "" | COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL) fail "job $JOB ended before it ran (${s:-gone})" ;;
        esac
        return 1
    }
    submit
    # srun only: a rank that dies of SIGSEGV before the cluster serves. Measured (cores of
    # two such deaths in ~35 launches under load): inside MPI_Init, Open MPI 4.1.4's TCP
    # BTL hands a peer's first message (ob1 MATCH, tag 0x41) to a handler ob1 has not
    # registered yet, a call through NULL; mpirun launches never showed it
    # (deploy/README.md). The job is resubmitted once, saying so; a second death fails.
    STARTUP_CRASH=0
    serving() {
        if [ "$MODE" = srun ] && grep -q "Segmentation fault" "$W/job-$JOB.out" 2>/dev/null; then
            STARTUP_CRASH=1
            return 0
        fi
        "$BIN/kvrelay" status --addr "$ADDR" --timeout 2 --json >"$W/status.json" 2>/dev/null &&
            [ "$(grep -o '"alive":true' "$W/status.json" | wc -l)" -eq 3 ]
    }
    wait_for 90 "coordinator of job $JOB serving at $ADDR" serving
    if [ "$STARTUP_CRASH" = 1 ]; then
        echo "srun launch: a rank of job $JOB died of SIGSEGV before the cluster served (Open MPI 4.1.4's" \
             "start-up race under direct launch, deploy/README.md):"
        grep -E "Segmentation fault|srun: error" "$W/job-$JOB.out" | head -n 4 | sed 's/^/    /'
        echo "resubmitting once"
        scancel "$JOB"
        wait_for 60 "job $JOB gone after scancel" job_gone "$JOB"
        for _ in $(seq 1 300); do no_leftovers && break; sleep 0.1; done
        submit
        STARTUP_CRASH=0
        wait_for 90 "coordinator of job $JOB serving at $ADDR" serving
        [ "$STARTUP_CRASH" = 0 ] || { cat "$W/job-$JOB.out"; fail "srun: a rank died of SIGSEGV at start-up twice"; }
    fi
    echo "serving at $ADDR $(elapsed "$t1") s after sbatch"
    for i in 2 3 4; do
        grep -q "\"host\":\"${H[$i]}\"" "$W/status.json" || fail "no node on ${H[$i]}: $(cat "$W/status.json")"
    done
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 ||
        fail "$MODE: golden streams"

    # A decode rank dies while 16 streams are running.
    VICTIM_HOST=$(grep -o '"role":"decode","host":"[^"]*"' "$W/status.json" | head -n1 | sed 's/.*"host":"//; s/"$//')
    rm -f "$W/ready"
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 16 --timeout 120 \
        --ready-file "$W/ready" >"$W/kill.out" 2>&1 &
    GS=$!
    wait_for 60 "streams running" test -e "$W/ready"
    VICTIM=$(node_pids "$VICTIM_HOST" kvrelay-decode)
    [ -n "$VICTIM" ] || fail "no kvrelay-decode on $VICTIM_HOST"
    echo "killing kvrelay-decode (pid $VICTIM) on $VICTIM_HOST mid-stream"
    kill -KILL $VICTIM
    wait "$GS" || { cat "$W/kill.out"; fail "$MODE: streams lost when a decode rank died"; }
    tail -n 1 "$W/kill.out"
    "$TBIN/golden_submit" --addr "$ADDR" --kvrelay "$BIN/kvrelay" --streams 4 --timeout 60 ||
        fail "$MODE: the cluster stopped serving after losing a decode rank"
    [ "$(job_state "$JOB")" = RUNNING ] || fail "$MODE: the job ended when a decode rank died"
    echo "scancel $JOB"
    t2=$(now)
    scancel "$JOB"
    wait_for 60 "job $JOB gone after scancel" job_gone "$JOB"
    for _ in $(seq 1 300); do no_leftovers && break; sleep 0.1; done
    no_leftovers || fail "processes of job $JOB left on the hosts 30 s after it ended:$(job_leftovers)"
    echo "no process of job $JOB left on any host ($(elapsed "$t2") s after the end)"
done
echo "PASS ($MODES)"
