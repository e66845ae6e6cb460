#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost, with accounting (slurmdbd + MariaDB), as root
# and without systemd. Everything lives under $CMSCALE_SLURM_DIR (default /tmp/cmscale-slurm):
# configs, state, spool, logs, pid files, the database and a private munge key and socket.
#
#   bash slurm/local/start.sh && source /tmp/cmscale-slurm/env.sh && sinfo
#
# Idempotent: daemons whose pid file names a live process of the right name are left alone, so a
# second call with everything up only waits for the node to be idle. Stop with slurm/local/stop.sh.
# Pitfalls this works around are listed in the comments (see also ../shared/slurm-notes.md).
set -euo pipefail

DIR="${CMSCALE_SLURM_DIR:-/tmp/cmscale-slurm}"
CLUSTER="${CMSCALE_SLURM_CLUSTER:-cmscale}"
CTLD_PORT="${CMSCALE_SLURMCTLD_PORT:-17817}"
SLURMD_PORT="${CMSCALE_SLURMD_PORT:-17818}"
DBD_PORT="${CMSCALE_SLURMDBD_PORT:-17819}"
DB_PORT="${CMSCALE_MARIADB_PORT:-17306}"
DB_PASS="cmscale-local"
HOST="$(hostname -s 2>/dev/null || cut -d. -f1 /proc/sys/kernel/hostname)"

log() { echo "start.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the daemons here run as root, without systemd)"

# ---------------------------------------------------------------------------------------------
# Packages
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sinfo >/dev/null || need+=(slurm-client)
command -v slurmdbd >/dev/null || need+=(slurmdbd)
command -v munged >/dev/null || need+=(munge)
command -v mariadbd >/dev/null || need+=(mariadb-server)
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# Layout. The munge socket directory must be 0755 and the key directory 0700, or munged fails
# with "Socket is inaccessible".
mkdir -p "$DIR"/{etc,run,log,state,spool/slurmd,munge/etc,munge/run,munge/lib,mysql}
chmod 0755 "$DIR" "$DIR/munge" "$DIR/munge/run"
chmod 0700 "$DIR/munge/etc" "$DIR/munge/lib"
MUNGE_KEY="$DIR/munge/etc/munge.key"
MUNGE_SOCKET="$DIR/munge/run/munge.socket"
DB_SOCKET="$DIR/mysql/mysqld.sock"
SLURM_CONF_FILE="$DIR/etc/slurm.conf"

# True when the pid file names a live process whose command name is $2.
running() {
    local pidfile="$1" comm="$2" pid
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------------
# Configs (rewritten on every call; identical content when nothing changed)
real_memory() {  # MiB, leaving room for the OS and the daemons
    local total
    total="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    echo $((total > 2048 ? total - 1024 : total))
}

cat >"$SLURM_CONF_FILE.new" <<EOF
# Written by slurm/local/start.sh: a one-node cluster on localhost for cmscale development and CI.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munge socket; cred_expire=10 lets a requeued job start again after 10 s, not 120 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No systemd and no cgroup v1 here: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, each job takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=1000
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd ignore AuthInfo; they find the private munge socket through this.
AccountingStoragePass=$MUNGE_SOCKET
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=2 RealMemory=$(real_memory) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$DIR/etc/slurmdbd.conf.new" <<EOF
# Written by slurm/local/start.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

slurm_conf_changed=0
for conf in "$SLURM_CONF_FILE" "$DIR/etc/slurmdbd.conf"; do
    if cmp -s "$conf.new" "$conf"; then
        rm -f "$conf.new"
    else
        mv "$conf.new" "$conf"
        [ "$conf" = "$SLURM_CONF_FILE" ] && slurm_conf_changed=1
    fi
done
chmod 0644 "$SLURM_CONF_FILE"
chmod 0600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read

cat >"$DIR/env.sh" <<EOF
# Source this to use the localhost cluster started by slurm/local/start.sh.
export SLURM_CONF="$SLURM_CONF_FILE"
export CMSCALE_SLURM_DIR="$DIR"
EOF
export SLURM_CONF="$SLURM_CONF_FILE"

# ---------------------------------------------------------------------------------------------
# munged
if ! running "$DIR/run/munged.pid" munged; then
    [ -s "$MUNGE_KEY" ] || mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null \
        || dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    chmod 0400 "$MUNGE_KEY"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "starting munged"
    munged --force --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/lib/munged.seed"
    wait_for 20 munged running "$DIR/run/munged.pid" munged || die "munged did not start; see $DIR/log/munged.log"
fi

# ---------------------------------------------------------------------------------------------
# mariadbd (private datadir, socket and port)
db() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }
if ! running "$DIR/run/mariadbd.pid" mariadbd; then
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        log "creating the accounting database in $DIR/mysql/data"
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
            --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    fi
    log "starting mariadbd"
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" --socket="$DB_SOCKET" \
        --pid-file="$DIR/run/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --log-error="$DIR/log/mariadbd.log" --innodb-buffer-pool-size=64M --skip-name-resolve \
        </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd db -e "SELECT 1" || die "mariadbd did not answer; see $DIR/log/mariadbd.log"
    wait_for 10 mariadbd running "$DIR/run/mariadbd.pid" mariadbd || die "mariadbd wrote no pid file"
fi
db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
       CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# ---------------------------------------------------------------------------------------------
# slurmdbd, then the cluster and account records, then slurmctld and slurmd
if ! running "$DIR/run/slurmdbd.pid" slurmdbd; then
    log "starting slurmdbd"
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster </dev/null || die "slurmdbd did not answer; see $DIR/log/slurmdbd.log"
fi
# sacctmgr reads answers from stdin when unsure; give it none.
if [ -z "$(sacctmgr -n -P list cluster "$CLUSTER" format=cluster </dev/null)" ]; then
    sacctmgr -i add cluster "$CLUSTER" </dev/null >/dev/null
fi
if [ -z "$(sacctmgr -n -P list account cmscale format=account </dev/null)" ]; then
    sacctmgr -i add account cmscale cluster="$CLUSTER" description="cmscale local" organization=cmscale </dev/null >/dev/null
fi
if [ -z "$(sacctmgr -n -P list assoc cluster="$CLUSTER" user=root account=cmscale format=user </dev/null)" ]; then
    sacctmgr -i add user root account=cmscale cluster="$CLUSTER" </dev/null >/dev/null
fi

if ! running "$DIR/run/slurmctld.pid" slurmctld; then
    log "starting slurmctld"
    slurmctld
    wait_for 30 slurmctld scontrol ping || die "slurmctld did not answer; see $DIR/log/slurmctld.log"
elif [ "$slurm_conf_changed" = 1 ]; then
    log "slurm.conf changed; reconfiguring the running daemons"
    scontrol reconfigure
fi
if ! running "$DIR/run/slurmd.pid" slurmd; then
    log "starting slurmd"
    slurmd -N "$HOST"
fi

node_ready() { sinfo -h -n "$HOST" -o %t | grep -Eq '^(idle|mix|alloc)'; }
if ! wait_for 30 node node_ready; then
    # A node left down or drained by an earlier run comes back here.
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    wait_for 30 node node_ready || die "node $HOST is not idle (sinfo: $(sinfo -h -o '%t %E')); see $DIR/log/slurmd.log"
fi
log "cluster $CLUSTER up: $(sinfo -h -o '%P %D %t'); source $DIR/env.sh"
