#!/usr/bin/env bash
# device-sim load benchmarks (BENCHMARKS.md, "device-sim load"): issue 5's performance targets,
# side by side, medians of ROUNDS rounds.
#
#   cargo build --release -p device-sim -p twin-server -p twin-benches
#   benches/device-sim-bench.sh [conns] [mqtt] [nats] [grpc]      # default: all four
#
# conns  one device-sim process holding CONN_DEVICES (10 000) MQTT connections (fleet-10k-hour
#        rescaled), established connections counted with `ss` mid-run.
# mqtt   QoS 0 publish rate to the broker: mqtt-baseline (bare rumqttc loop, same connections,
#        same payload size, same QoS) and device-sim alternately, device-sim with its checker
#        (default) and with --no-checker; the baseline also with publish_bytes (device-sim's
#        call) and with one subscriber (as device-sim's checker is one).
# nats   core NATS publish and JetStream publish with async acks (its own stream, created and
#        deleted by device-sim).
# grpc   telemetry batches to a `twin serve` release binary in another process (temp data dir).
#
# Only 127.0.0.1; every run is bounded (--duration / --seconds); temp dirs are removed at exit.
# Environment: ROUNDS (3), SECS (10), MQTT_PORT (1883), NATS_PORT (4222), GRPC_PORT (17878),
# MQTT_DEVICES (100), MQTT_RATE (open-loop offered rate, 1200000/s: above what the client can
# publish, so the figure is its limit; the bare loop reached 580k/s on a quiet machine, so 600k/s
# would cap device-sim near it), NATS_CORE_RATE (400000), JS_RATE (200000), GRPC_SCALE (10: 100 devices x 1 kHz x 10 = 1 M samples/s), CONN_DEVICES
# (10000), CONN_RATE (2000 connections/s), CONN_MSG_RATE (1000 msgs/s over the 10k connections,
# open loop, so the run lasts its 30 s), TARGET_DIR (${CARGO_TARGET_DIR:-target}).
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
MQTT_PORT=${MQTT_PORT:-1883}
NATS_PORT=${NATS_PORT:-4222}
GRPC_PORT=${GRPC_PORT:-17878}
MQTT_DEVICES=${MQTT_DEVICES:-100}
MQTT_RATE=${MQTT_RATE:-1200000}
NATS_CORE_RATE=${NATS_CORE_RATE:-400000}
JS_RATE=${JS_RATE:-200000}
GRPC_SCALE=${GRPC_SCALE:-10}
CONN_DEVICES=${CONN_DEVICES:-10000}
CONN_RATE=${CONN_RATE:-2000}
CONN_MSG_RATE=${CONN_MSG_RATE:-1000}
TARGET_DIR=${TARGET_DIR:-${CARGO_TARGET_DIR:-target}}
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(conns mqtt nats grpc)

TMP=$(mktemp -d -t device-sim-bench.XXXXXX)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# Copies of the release binaries (another build may overwrite target/release mid-run).
mkdir -p "$TMP/bin"
need=(device-sim)
for section in "${SECTIONS[@]}"; do
    case $section in mqtt) need+=(mqtt-baseline) ;; grpc) need+=(twin) ;; esac
done
for bin in "${need[@]}"; do
    cp "$TARGET_DIR/release/$bin" "$TMP/bin/$bin" || {
        echo "missing $TARGET_DIR/release/$bin: cargo build --release -p device-sim -p twin-server -p twin-benches" >&2
        exit 2
    }
done
DS=$TMP/bin/device-sim
TAG=dsbench$$

say() { printf '%s\n' "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
# median of the numbers on stdin (one a line)
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
# jq expression over a report file
jqf() { jq -r "$1" "$2"; }
fmt() { awk -v x="$1" 'BEGIN {printf "%.0f", x}'; }

say "device-sim bench: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(date -u '+%Y-%m-%d %H:%M UTC'), load $(load)"
say "ulimit -n (this shell, so device-sim): $(ulimit -n)"
for pid in $(pgrep -x mosquitto || true); do say "mosquitto pid $pid: $(grep 'Max open files' /proc/$pid/limits)"; done

run_conns() {
    say ""
    say "== conns: one process, $CONN_DEVICES MQTT connections (ramp $CONN_RATE/s), $CONN_MSG_RATE msgs/s over them, 30 s =="
    say "load before: $(load)"
    local json=$TMP/conns.json
    "$DS" run scenarios/fleet-10k-hour.toml --devices "$CONN_DEVICES" --duration 30s --rate "$CONN_MSG_RATE" \
        --target "mqtt://127.0.0.1:$MQTT_PORT" --qos 0 --connect-rate "$CONN_RATE" \
        --topic "$TAG/{id}/telemetry" --command-topic "$TAG/{id}/desired" --client-id "$TAG-{id}" \
        --connect-timeout 10s --no-progress --json "$json" >"$TMP/conns.out" 2>"$TMP/conns.err" &
    local pid=$!
    sleep 20
    local established fds
    established=$(ss -Htn state established "( dport = :$MQTT_PORT )" | wc -l || true)
    fds=$(ls /proc/$pid/fd 2>/dev/null | wc -l || true)
    local load_mid; load_mid=$(load)
    wait $pid || say "device-sim exited $?"
    say "established client sockets to :$MQTT_PORT at 20 s: $established (device-sim open fds: $fds); load mid-run: $load_mid"
    jq -c '{devices: .run.devices, connects: .connections.connects, failures: .connections.failures,
            reconnects: .connections.reconnects, rate_per_s: .connections.rate_per_s,
            connect_p50_ms: .connections.latency.p50_ms, connect_p99_ms: .connections.latency.p99_ms,
            sent: .messages.sent, received: .messages.received, lost: .messages.lost, errors: .messages.errors,
            e2e_p99_ms: .e2e.p99_ms, cpu_seconds: .cost.cpu_seconds}' "$json" >&2
    echo "conns devices=$CONN_DEVICES established_at_20s=$established connects=$(jqf .connections.connects "$json") failures=$(jqf .connections.failures "$json") lost=$(jqf .messages.lost "$json")"
}

run_mqtt() {
    say ""
    say "== mqtt: QoS 0 publish rate, $MQTT_DEVICES connections, $SECS s, $ROUNDS rounds =="
    say "load before: $(load)"
    local target="mqtt://127.0.0.1:$MQTT_PORT"
    local common=(--target "$target" --qos 0 --devices "$MQTT_DEVICES" --rate "$MQTT_RATE"
        --topic "$TAG/{id}/telemetry" --command-topic "$TAG/{id}/desired" --client-id "$TAG-{id}"
        --no-progress)
    # The payload size device-sim sends at this rate: a 3 s probe run, sizes read by mosquitto_sub.
    timeout 8 mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -t "$TAG/+/telemetry" -C 500 -F '%l' >"$TMP/sizes" 2>/dev/null &
    local sub=$!
    sleep 0.5
    "$DS" run benches/scenarios/device-sim-load.toml "${common[@]}" --duration 3s >/dev/null 2>&1 || true
    wait $sub 2>/dev/null || true
    local bytes; bytes=$(median <"$TMP/sizes")
    bytes=$(fmt "$bytes")
    say "device-sim payload (json, median of $(wc -l <"$TMP/sizes") messages): $bytes bytes"
    # Each round runs, in this order: the bare loop; device-sim with its checker (the default);
    # the bare loop on publish_bytes (device-sim's call, a cheaper loop); device-sim with
    # --no-checker (the publishing side alone, as a bare publisher has no subscriber); the bare
    # loop with one subscriber. Ratios are taken per round, then their median.
    local base=() basepb=() basesub=() ds=() dsnc=() dsrecv=() dscore=() dsnccore=() basecore=()
    local ratio=() ratio_nc=() ratio_sub=() ratio_nc_pb=()
    for r in $(seq 1 "$ROUNDS"); do
        local bj=$TMP/base-$r.json pj=$TMP/basepb-$r.json sj=$TMP/basesub-$r.json dj=$TMP/ds-mqtt-$r.json nj=$TMP/ds-mqtt-nc-$r.json
        "$TMP/bin/mqtt-baseline" --port "$MQTT_PORT" --connections "$MQTT_DEVICES" --seconds "$SECS" \
            --payload-bytes "$bytes" --qos 0 >"$bj"
        "$DS" run benches/scenarios/device-sim-load.toml "${common[@]}" --duration "${SECS}s" --json "$dj" \
            >/dev/null 2>"$TMP/ds-mqtt-$r.err" || true
        "$TMP/bin/mqtt-baseline" --port "$MQTT_PORT" --connections "$MQTT_DEVICES" --seconds "$SECS" \
            --payload-bytes "$bytes" --qos 0 --publish-bytes >"$pj"
        "$DS" run benches/scenarios/device-sim-load.toml "${common[@]}" --duration "${SECS}s" --no-checker \
            --json "$nj" >/dev/null 2>"$TMP/ds-mqtt-nc-$r.err" || true
        "$TMP/bin/mqtt-baseline" --port "$MQTT_PORT" --connections "$MQTT_DEVICES" --seconds "$SECS" \
            --payload-bytes "$bytes" --qos 0 --subscribe >"$sj"
        local b p s d n dr dc nc bc
        b=$(jqf .msgs_per_s "$bj"); p=$(jqf .msgs_per_s "$pj"); s=$(jqf .msgs_per_s "$sj")
        d=$(jq -r '.messages.published / .send_seconds' "$dj")
        n=$(jq -r '.messages.published / .send_seconds' "$nj")
        dr=$(jq -r '(.messages.received // 0) / .send_seconds' "$dj")
        dc=$(jq -r 'if .cost.cpu_seconds > 0 then .messages.published / .cost.cpu_seconds else 0 end' "$dj")
        nc=$(jq -r 'if .cost.cpu_seconds > 0 then .messages.published / .cost.cpu_seconds else 0 end' "$nj")
        bc=$(jqf '.msgs_per_core_s // 0' "$bj")
        base+=("$b"); basepb+=("$p"); basesub+=("$s"); ds+=("$d"); dsnc+=("$n"); dsrecv+=("$dr")
        dscore+=("$dc"); dsnccore+=("$nc"); basecore+=("$bc")
        ratio+=("$(awk -v d="$d" -v b="$b" 'BEGIN {print d/b}')")
        ratio_nc+=("$(awk -v d="$n" -v b="$b" 'BEGIN {print d/b}')")
        ratio_sub+=("$(awk -v d="$d" -v b="$s" 'BEGIN {print d/b}')")
        ratio_nc_pb+=("$(awk -v d="$n" -v b="$p" 'BEGIN {print d/b}')")
        say "round $r: baseline $(fmt "$b")/s (cpu $(jqf .cpu_seconds "$bj") s) | device-sim published $(fmt "$d")/s, received $(fmt "$dr")/s, overflows $(jqf .messages.overflows "$dj"), cpu $(jqf .cost.cpu_seconds "$dj") s | baseline publish_bytes $(fmt "$p")/s (cpu $(jqf .cpu_seconds "$pj") s) | device-sim --no-checker published $(fmt "$n")/s, overflows $(jqf .messages.overflows "$nj"), cpu $(jqf .cost.cpu_seconds "$nj") s | baseline+subscriber $(fmt "$s")/s (received $(jqf .received "$sj")) | load $(load)"
    done
    med() { printf '%s\n' "$@" | median; }
    local mb md
    mb=$(med "${base[@]}"); md=$(med "${ds[@]}")
    echo "mqtt payload_bytes=$bytes connections=$MQTT_DEVICES offered=$MQTT_RATE baseline=$(fmt "$mb") baseline_publish_bytes=$(fmt "$(med "${basepb[@]}")") baseline_with_subscriber=$(fmt "$(med "${basesub[@]}")") device_sim=$(fmt "$md") device_sim_no_checker=$(fmt "$(med "${dsnc[@]}")") device_sim_received=$(fmt "$(med "${dsrecv[@]}")") ratio_median_of_rounds=$(med "${ratio[@]}") ratio_no_checker_median_of_rounds=$(med "${ratio_nc[@]}") ratio_vs_baseline_with_subscriber=$(med "${ratio_sub[@]}") ratio_no_checker_vs_publish_bytes_baseline=$(med "${ratio_nc_pb[@]}") ratio_of_medians=$(awk -v d="$md" -v b="$mb" 'BEGIN {printf "%.3f", d/b}') device_sim_msgs_per_core_s=$(fmt "$(med "${dscore[@]}")") device_sim_no_checker_msgs_per_core_s=$(fmt "$(med "${dsnccore[@]}")") baseline_msgs_per_core_s=$(fmt "$(med "${basecore[@]}")")"
}

run_nats() {
    say ""
    say "== nats: core publish (offered $NATS_CORE_RATE/s) and JetStream async acks (offered $JS_RATE/s), $SECS s, $ROUNDS rounds =="
    say "load before: $(load)"
    local target="nats://127.0.0.1:$NATS_PORT"
    local core=() corecpu=() js=() jsack=() jscpu=()
    for r in $(seq 1 "$ROUNDS"); do
        local cj=$TMP/nats-core-$r.json jj=$TMP/nats-js-$r.json
        "$DS" run benches/scenarios/device-sim-load.toml --target "$target" --devices 100 --rate "$NATS_CORE_RATE" \
            --duration "${SECS}s" --topic "$TAG.{id}.telemetry" --no-progress --json "$cj" >/dev/null 2>"$TMP/nats-core-$r.err" || true
        "$DS" run benches/scenarios/device-sim-load.toml --target "$target" --devices 100 --rate "$JS_RATE" \
            --duration "${SECS}s" --topic "$TAG.{id}.telemetry" --stream "${TAG^^}_$r" --create-stream --delete-stream \
            --no-progress --json "$jj" >/dev/null 2>"$TMP/nats-js-$r.err" || true
        local c cc j ja jc
        c=$(jq -r '.messages.published / .send_seconds' "$cj")
        cc=$(jq -r 'if .cost.cpu_seconds > 0 then .messages.published / .cost.cpu_seconds else 0 end' "$cj")
        j=$(jq -r '.messages.published / .send_seconds' "$jj")
        ja=$(jq -r '.messages.acks / .send_seconds' "$jj")
        jc=$(jq -r 'if .cost.cpu_seconds > 0 then .messages.acks / .cost.cpu_seconds else 0 end' "$jj")
        core+=("$c"); corecpu+=("$cc"); js+=("$j"); jsack+=("$ja"); jscpu+=("$jc")
        say "round $r: core published $(fmt "$c")/s (received $(jqf .messages.received "$cj"), overflows $(jqf .messages.overflows "$cj"), cpu $(jqf .cost.cpu_seconds "$cj") s) | JetStream published $(fmt "$j")/s, acked $(fmt "$ja")/s (acks $(jqf .messages.acks "$jj"), errors $(jqf .messages.errors "$jj"), overflows $(jqf .messages.overflows "$jj"), ack p99 $(jqf .ack.p99_ms "$jj") ms, cpu $(jqf .cost.cpu_seconds "$jj") s) | load $(load)"
    done
    echo "nats core_published=$(fmt "$(printf '%s\n' "${core[@]}" | median)") core_msgs_per_core_s=$(fmt "$(printf '%s\n' "${corecpu[@]}" | median)") jetstream_published=$(fmt "$(printf '%s\n' "${js[@]}" | median)") jetstream_acked=$(fmt "$(printf '%s\n' "${jsack[@]}" | median)") jetstream_acks_per_core_s=$(fmt "$(printf '%s\n' "${jscpu[@]}" | median)")"
}

run_grpc() {
    say ""
    say "== grpc: telemetry batches to twin serve (another process), 100 devices x 1 kHz x scaled:$GRPC_SCALE, $SECS s, $ROUNDS rounds =="
    mkdir -p "$TMP/twin-data"
    "$TMP/bin/twin" serve --listen "127.0.0.1:$GRPC_PORT" --metrics-listen "127.0.0.1:$((GRPC_PORT + 1))" \
        --data "$TMP/twin-data" >"$TMP/serve.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$GRPC_PORT") 2>/dev/null && break
        sleep 0.1
    done
    say "load before: $(load)"
    local samples=() msgs=() cpu=() lag=()
    for r in $(seq 1 "$ROUNDS"); do
        local gj=$TMP/grpc-$r.json
        "$DS" run benches/scenarios/device-sim-grpc.toml --target "grpc://127.0.0.1:$GRPC_PORT" \
            --clock "scaled:$GRPC_SCALE" --duration "${SECS}s" --no-progress --json "$gj" \
            >/dev/null 2>"$TMP/grpc-$r.err" || true
        local s m c
        s=$(jq -r '.messages.samples_sent / .send_seconds' "$gj")
        m=$(jq -r '.messages.published / .send_seconds' "$gj")
        c=$(jq -r 'if .cost.cpu_seconds > 0 then .messages.published / .cost.cpu_seconds else 0 end' "$gj")
        samples+=("$s"); msgs+=("$m"); cpu+=("$c")
        say "round $r: $(fmt "$s") samples/s in $(fmt "$m") batches/s (sent $(jqf .messages.sent "$gj"), published $(jqf .messages.published "$gj"), received $(jqf .messages.received "$gj"), lost $(jqf .messages.lost "$gj"), errors $(jqf .messages.errors "$gj"), e2e p50 $(jqf .e2e.p50_ms "$gj") ms p99 $(jqf .e2e.p99_ms "$gj") ms, cpu $(jqf .cost.cpu_seconds "$gj") s) | load $(load)"
    done
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
    echo "grpc samples_per_s=$(fmt "$(printf '%s\n' "${samples[@]}" | median)") batches_per_s=$(fmt "$(printf '%s\n' "${msgs[@]}" | median)") batches_per_core_s=$(fmt "$(printf '%s\n' "${cpu[@]}" | median)")"
}

for section in "${SECTIONS[@]}"; do
    case $section in
        conns) run_conns ;;
        mqtt) run_mqtt ;;
        nats) run_nats ;;
        grpc) run_grpc ;;
        *) say "unknown section $section (conns, mqtt, nats, grpc)"; exit 2 ;;
    esac
done
say ""
say "load after: $(load)"
