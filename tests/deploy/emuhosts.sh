#!/usr/bin/env bash
# emuhosts.sh - emulated hosts on one Linux machine, for the multi-host tests and benchmarks.
# Each host is a network namespace (its own interfaces, routes and ports) with its own UTS
# namespace (its own hostname), its own /etc/hosts and its own /tmp (bound in a private
# mount namespace by the state directory's `enter` script; the rest of the filesystem is
# shared, as a cluster's shared filesystem would be), joined to one bridge by a veth pair: the host's "NIC" and
# "cable". Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking range, routed nowhere);
# the hosts get no default route, IPv6 is off on every link, and IP forwarding is not
# touched, so nothing the hosts send can leave the bridge. The machine itself reaches the
# hosts through the bridge's address (x.y.z.254): it plays the client on the network.
#
# Links are shaped with tc tbf (both directions of a host's veth pair). This kernel has no
# netem: latency and loss cannot be emulated, only bandwidth.
#
#   emuhosts.sh up PREFIX N         create hosts PREFIX-h1..PREFIX-hN; prints KEY=VALUE lines
#   emuhosts.sh down PREFIX         kill every process in the hosts, remove everything
#   emuhosts.sh exec PREFIX HOST CMD...   run CMD on HOST (h1.. or the full name)
#   emuhosts.sh shape PREFIX HOST RATE    tbf both directions (e.g. 1gbit, 10gbit; none)
#   emuhosts.sh link PREFIX HOST up|down  plug or unplug the host's cable
#   emuhosts.sh pids PREFIX [HOST]        pids of processes running in the host(s)
#   emuhosts.sh podman-net PREFIX   a podman (CNI) network "PREFIX-net" on the instance's
#                                   bridge: containers get .128-.250, no gateway, no NAT
#   emuhosts.sh gc                  remove instances whose creating process is gone
#   emuhosts.sh check               exit 0 if this machine can run emulated hosts, else print why, exit 77
#
# PREFIX: 1-11 characters [a-z0-9], unique per run (e.g. the branch or test name plus $$):
# it names the bridge (PREFIXbr), the veths (PREFIXvN), the namespaces (PREFIX-hN) and the
# state directory /run/kvr-emuhosts/PREFIX, which holds:
#   enter     "enter HOST CMD..." runs CMD on HOST (what `exec` runs)
#   agent     an rsh agent for mpirun (--mca plm_rsh_agent): "agent HOST CMD..." runs CMD on
#             HOST through `sh -c`, as ssh would
#   hostfile  "PREFIX-hN slots=1" per host, for mpirun
#   env       the KEY=VALUE lines printed by `up` (SUBNET, BRIDGE_IP, HOSTn, IPn, MCA...)
# `up` records the calling process (its parent, the test) as the owner: `gc` (run by every
# `up`) removes instances whose owner has died without running `down` (a test killed by
# a timeout), so a crashed run cannot leak namespaces into the next one.
set -euo pipefail

ROOT=/run/kvr-emuhosts
TMPROOT=/var/tmp/kvr-emuhosts # each host's /tmp: /var/tmp/kvr-emuhosts/PREFIX/HOST
LOCK=/run/kvr-emuhosts.lock

die() { echo "emuhosts: $*" >&2; exit 1; }

check_prefix() {
    [[ $1 =~ ^[a-z0-9]{1,11}$ ]] || die "PREFIX must be 1-11 characters [a-z0-9], got '$1'"
}

# Resolves h3 or PREFIX-h3 to PREFIX-h3 (must exist in this instance).
host_name() {
    local p=$1 h=$2
    [[ $h == "$p"-* ]] || h="$p-$h"
    [ -e "$ROOT/$p/$h.uts" ] || die "no host $h in instance $p"
    echo "$h"
}

cmd_check() {
    local why=""
    if [ "$(id -u)" -ne 0 ]; then
        why="not root (creating network namespaces needs CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    elif ! command -v ip >/dev/null || ! command -v tc >/dev/null || ! command -v nsenter >/dev/null ||
         ! command -v unshare >/dev/null; then
        why="ip, tc, nsenter or unshare missing (packages iproute2, util-linux)"
    else
        local t="kvrchk$$"
        t=${t:0:11}
        if ! ip netns add "$t-h" 2>/dev/null; then
            why="cannot create a network namespace (ip netns add failed: no CAP_NET_ADMIN or no netns support)"
        else
            if ! ip link add "${t}v" type veth peer name eth0 netns "$t-h" 2>/dev/null; then
                why="cannot create a veth pair into a namespace"
            elif ! ip link add "${t}b" type bridge 2>/dev/null; then
                why="cannot create a bridge"
            elif ! tc qdisc add dev "${t}v" root tbf rate 1gbit burst 128kb latency 50ms 2>/dev/null; then
                why="tc cannot add a tbf qdisc (sch_tbf missing)"
            elif ! unshare --uts true 2>/dev/null; then
                why="cannot create a UTS namespace (unshare --uts failed)"
            fi
            ip link del "${t}b" 2>/dev/null || true
            ip link del "${t}v" 2>/dev/null || true
            ip netns del "$t-h" 2>/dev/null || true
        fi
    fi
    if [ -n "$why" ]; then
        echo "emuhosts: this machine cannot run emulated hosts: $why"
        exit 77
    fi
}

# Picks a /24 in 198.18.0.0/15 that no other instance on this machine uses (their bridges
# carry .254 of theirs in the root namespace). Caller holds the lock.
pick_subnet() {
    local used i a b
    used=$(ip -4 -o addr show | awk '{print $4}' | grep -E '^198\.1[89]\.' || true)
    for i in $(seq 0 511); do
        # Start from a pid-derived offset so concurrent instances rarely probe the same nets.
        local j=$(( (i + $$) % 512 ))
        a=$((18 + j / 256)); b=$((j % 256))
        if ! grep -q "^198\.$a\.$b\." <<<"$used"; then
            echo "198.$a.$b"
            return 0
        fi
    done
    die "no free /24 left in 198.18.0.0/15"
}

sysctl_off_v6() { # [netns] iface: no IPv6 on our links (no link-local chatter, no SLAAC)
    local ns=$1 dev=$2
    if [ -n "$ns" ]; then
        ip netns exec "$ns" sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=1" >/dev/null 2>&1 || true
    else
        sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=1" >/dev/null 2>&1 || true
    fi
}

cmd_up() {
    local p=$1 n=$2
    check_prefix "$p"
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "N must be 1..64"
    cmd_gc
    local st="$ROOT/$p"
    [ -e "$st" ] && die "instance $p exists already ($st)"
    mkdir -p "$ROOT"
    exec 9>"$LOCK"
    flock 9
    local net
    net=$(pick_subnet)
    mkdir -p "$st"
    echo "${EMUHOSTS_OWNER:-$PPID}" >"$st/owner"
    echo "$net" >"$st/subnet"
    # From here on a failure must not leave half an instance behind.
    trap 'cmd_down "$p" >/dev/null 2>&1 || true' ERR
    local br="${p}br"
    ip link add "$br" type bridge
    sysctl_off_v6 "" "$br"
    ip addr add "$net.254/24" dev "$br"
    ip link set "$br" up
    flock -u 9
    exec 9>&-
    {
        for i in $(seq 1 "$n"); do echo "$net.$i $p-h$i"; done
        echo "$net.254 $p-gw"
    } >"$st/hosts"
    : >"$st/hostfile"
    local env="$st/env"
    {
        echo "PREFIX=$p"
        echo "N_HOSTS=$n"
        echo "SUBNET=$net.0/24"
        echo "BRIDGE=$br"
        echo "BRIDGE_IP=$net.254"
        echo "STATE=$st"
        echo "AGENT=$st/agent"
        echo "HOSTFILE=$st/hostfile"
    } >"$env"
    for i in $(seq 1 "$n"); do
        local h="$p-h$i" v="${p}v$i"
        ip netns add "$h"
        ip netns exec "$h" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null
        ip link add "$v" type veth peer name eth0 netns "$h"
        sysctl_off_v6 "" "$v"
        ip link set "$v" master "$br" up
        ip -n "$h" addr add "$net.$i/24" dev eth0
        ip -n "$h" link set lo up
        ip -n "$h" link set eth0 up
        # Its own hostname, kept in a persistent UTS namespace bound to a file.
        touch "$st/$h.uts"
        unshare --uts="$st/$h.uts" hostname "$h"
        # Its own /etc/hosts: every emulated host and the gateway, as a site's DNS would.
        { echo "127.0.0.1 localhost"; cat "$st/hosts"; } >"$st/$h.hosts"
        mkdir -p "$TMPROOT/$p/$h"
        chmod 1777 "$TMPROOT/$p/$h"
        echo "$h slots=1" >>"$st/hostfile"
        echo "HOST$i=$h" >>"$env"
        echo "IP$i=$net.$i" >>"$env"
    done
    # The MCA settings a site needs (deploy/README.md): TCP between hosts, on the
    # cluster's network only, daemons started through the agent. Exported for mpirun.
    cat >>"$env" <<EOF
OMPI_MCA_plm_rsh_agent=$st/agent
OMPI_MCA_btl=tcp,self
OMPI_MCA_btl_tcp_if_include=$net.0/24
OMPI_MCA_oob_tcp_if_include=$net.0/24
OMPI_MCA_pml=ob1
EOF
    # Entering a host: its network and UTS namespaces, and a private mount namespace in
    # which /etc/hosts is the instance's and /tmp is the host's own (as on real machines:
    # Slurm's PMIx plugin and Open MPI keep per-node files there under fixed names). Not `ip netns exec`: it remounts /sys for the
    # namespace, which hides /sys/fs/cgroup (slurmd refuses to start without it).
    cat >"$st/enter" <<EOF
#!/bin/sh
# enter HOST CMD...: runs CMD on emulated host HOST of instance $p (made by emuhosts.sh).
h=\$1; shift
case "\$h" in $p-*) ;; *) h="$p-\$h";; esac
[ -e "$st/\$h.uts" ] || { echo "enter: unknown host \$h" >&2; exit 255; }
exec nsenter --net="/run/netns/\$h" --uts="$st/\$h.uts" -- unshare --mount --propagation private -- \\
    sh -c 'mount --bind "\$0" /etc/hosts && mount --bind "\$1" /tmp && shift && exec "\$@"' \\
    "$st/\$h.hosts" "$TMPROOT/$p/\$h" "\$@"
EOF
    # The rsh agent. Open MPI calls it as ssh: "agent [ssh options] HOST WORDS...", where
    # the words form one shell command line for the remote shell.
    cat >"$st/agent" <<EOF
#!/bin/sh
# rsh agent of emulated-hosts instance $p (made by emuhosts.sh): enters HOST as ssh would.
while [ \$# -gt 0 ]; do case "\$1" in -*) shift;; *) break;; esac; done
h=\$1; shift
exec "$st/enter" "\$h" sh -c "cd / && \$*"
EOF
    chmod +x "$st/enter"
    chmod +x "$st/agent"
    trap - ERR
    cat "$env"
}

cmd_exec() {
    local p=$1 h
    check_prefix "$p"
    h=$(host_name "$p" "$2")
    shift 2
    [ $# -ge 1 ] || die "exec: no command"
    exec "$ROOT/$p/enter" "$h" "$@"
}

cmd_shape() {
    local p=$1 h rate=$3
    check_prefix "$p"
    h=$(host_name "$p" "$2")
    local v="${p}v${h##*-h}"
    tc qdisc del dev "$v" root 2>/dev/null || true
    ip netns exec "$h" tc qdisc del dev eth0 root 2>/dev/null || true
    [ "$rate" = none ] && return 0
    # tbf: the bucket must hold at least one GSO super-packet (64 KiB) and several ms of
    # traffic at high rates, or TCP stalls on it; the queue holds ~20 ms at the rate.
    local bps
    bps=$(rate_bps "$rate")
    local burst=$((bps / 8 / 250))
    [ "$burst" -lt 131072 ] && burst=131072
    tc qdisc add dev "$v" root tbf rate "$rate" burst "$burst" latency 20ms
    ip netns exec "$h" tc qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 20ms
}

rate_bps() { # 10gbit, 500mbit, 100kbit, 1000000 -> bits/s
    local r=$1 num unit
    num=${r%%[a-z]*}; unit=${r#"$num"}
    case "$unit" in
    "" | bit) echo "$num" ;;
    kbit) echo $((num * 1000)) ;;
    mbit) echo $((num * 1000000)) ;;
    gbit) echo $((num * 1000000000)) ;;
    *) die "rate '$r': use NUMBER[kbit|mbit|gbit]" ;;
    esac
}

cmd_link() {
    local p=$1 h
    check_prefix "$p"
    h=$(host_name "$p" "$2")
    case "$3" in up | down) ;; *) die "link: up or down" ;; esac
    # The bridge-side end: like pulling the cable at the switch, the host keeps its
    # address and sees its carrier drop.
    ip link set "${p}v${h##*-h}" "$3"
}

cmd_pids() {
    local p=$1
    check_prefix "$p"
    local hosts
    if [ $# -ge 2 ]; then hosts=$(host_name "$p" "$2"); else hosts=$(cd "$ROOT/$p" 2>/dev/null && ls -- *.uts 2>/dev/null | sed 's/\.uts$//'); fi
    for h in $hosts; do ip netns pids "$h" 2>/dev/null || true; done
}

cmd_down() {
    local p=$1
    check_prefix "$p"
    local st="$ROOT/$p"
    local hosts="" i
    hosts=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$p-h[0-9]+$" || true)
    # Every process in every host: SIGKILL, then wait until the namespaces are empty.
    for i in 1 2 3 4 5 6 7 8 9 10; do
        local left=""
        for h in $hosts; do left="$left $(ip netns pids "$h" 2>/dev/null | tr '\n' ' ')"; done
        left=$(echo $left)
        [ -z "$left" ] && break
        kill -9 $left 2>/dev/null || true
        sleep 0.2
    done
    for h in $hosts; do
        ip netns del "$h" 2>/dev/null || true
    done
    if [ -d "$st" ]; then
        for f in "$st"/*.uts; do
            [ -e "$f" ] || continue
            umount "$f" 2>/dev/null || true
        done
    fi
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${p}(br|v[0-9]+)$" || true); do
        ip link del "$l" 2>/dev/null || true
    done
    rm -f "/etc/cni/net.d/$p-net.conflist"
    rm -rf "$st" "${TMPROOT:?}/$p" "/var/lib/cni/networks/$p-net"
}

# Containers as hosts: a CNI network on the instance's own bridge, so podman containers
# and pods (podman kube play cannot join a namespace by path) sit on the same test network
# as the emulated hosts. Internal: no gateway, no masquerade, no default route.
cmd_podman_net() {
    local p=$1
    check_prefix "$p"
    local st="$ROOT/$p" net
    net=$(cat "$st/subnet" 2>/dev/null) || die "no instance $p"
    mkdir -p /etc/cni/net.d
    cat >"/etc/cni/net.d/$p-net.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$p-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${p}br",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {"type": "host-local",
               "ranges": [[{"subnet": "$net.0/24", "rangeStart": "$net.128", "rangeEnd": "$net.250"}]]}
    }
  ]
}
EOF
    echo "$p-net"
}

cmd_gc() {
    [ -d "$ROOT" ] || return 0
    local d p o
    for d in "$ROOT"/*/; do
        [ -d "$d" ] || continue
        p=$(basename "$d")
        o=$(cat "$d/owner" 2>/dev/null || echo 0)
        if [ "$o" -gt 1 ] 2>/dev/null && kill -0 "$o" 2>/dev/null; then continue; fi
        echo "emuhosts: removing instance $p (its owner $o is gone)" >&2
        cmd_down "$p" || true
    done
}

[ $# -ge 1 ] || die "usage: emuhosts.sh up|down|exec|shape|link|pids|gc|check ..."
sub=$1; shift
case "$sub" in
up) [ $# -eq 2 ] || die "usage: up PREFIX N"; cmd_up "$@" ;;
down) [ $# -eq 1 ] || die "usage: down PREFIX"; cmd_down "$@" ;;
exec) [ $# -ge 3 ] || die "usage: exec PREFIX HOST CMD..."; cmd_exec "$@" ;;
shape) [ $# -eq 3 ] || die "usage: shape PREFIX HOST RATE"; cmd_shape "$@" ;;
link) [ $# -eq 3 ] || die "usage: link PREFIX HOST up|down"; cmd_link "$@" ;;
pids) [ $# -ge 1 ] || die "usage: pids PREFIX [HOST]"; cmd_pids "$@" ;;
podman-net) [ $# -eq 1 ] || die "usage: podman-net PREFIX"; cmd_podman_net "$@" ;;
gc) cmd_gc ;;
check) cmd_check ;;
*) die "unknown subcommand '$sub'" ;;
esac
