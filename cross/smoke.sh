#!/usr/bin/env bash
# Smoke test of the aarch64 edge-agent under qemu-aarch64: start it, ingest a simulated
# stream, let it infer, read its status, and compare its decisions with the x86-64 build's
# on the same input. Needs both builds (cargo build --release; cross/build.sh, whose
# CROSS_TARGET_DIR it takes too).
set -euo pipefail
cd "$(dirname "$0")/.."
ARM=${CROSS_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/edge-agent
X86=target/release/edge-agent
QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
for b in "$ARM" "$X86"; do [ -x "$b" ] || { echo "smoke: $b is missing" >&2; exit 1; }; done
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

run_agent() { # name, command...
  local name=$1; shift
  "$@" run --data-dir "$WORK/$name" --listen 127.0.0.1:0 --log warn >"$WORK/$name.out" 2>"$WORK/$name.err" &
  PIDS+=($!)
  local pid=$!
  for _ in $(seq 1 600); do
    if grep -q "listening on" "$WORK/$name.out"; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "smoke: $name agent died:"; cat "$WORK/$name.err"; exit 1; fi
    sleep 0.1
  done
  URL=$(sed -n 's/^edge-agent listening on //p' "$WORK/$name.out")
  [ -n "$URL" ] || { echo "smoke: $name agent did not start"; cat "$WORK/$name.err"; exit 1; }
  AGENT_PID=$pid
}

compare_one() { # name, command...
  local name=$1; shift
  run_agent "$name" "$@"
  echo "smoke: $name agent at $URL"
  "$X86" simulate --target "$URL" --machines 4 --ticks 480 --fast --seed 11 --start-ms 1795417200000 --json >"$WORK/$name.sim"
  curl -fsS "$URL/v1/status" >"$WORK/$name.status"
  kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true
  "$@" export --data-dir "$WORK/$name" cases >"$WORK/$name.cases"
}

compare_one x86 "$X86"
compare_one arm "${QEMU[@]}" "$ARM"

python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
def load(n):
    return [json.loads(l) for l in open(f"{w}/{n}.cases") if l.strip()]
x, a = load("x86"), load("arm")
st = json.load(open(f"{w}/arm.status"))
sim = json.load(open(f"{w}/arm.sim"))
assert sim["records"] == 4 * 480, sim
assert st["store"]["records"] == 4 * 480, st["store"]
assert len(x) == len(a) == 4 * 480 // 16, (len(x), len(a))
key = lambda c: (c["id"], c["decision"], c["reason"], c["class"])
diff = [(p, q) for p, q in zip(map(key, x), map(key, a)) if p != q]
maxd = max(abs(p["probs"][k] - q["probs"][k]) for p, q in zip(x, a) for k in p["probs"])
hard = sum(c["decision"] == "hard" for c in a)
print(f"smoke: aarch64 under qemu: {len(a)} cases ({hard} hard), status ok; "
      f"decisions identical to x86-64: {not diff}; max |Δprob| {maxd:.2e}")
if diff:
    print("smoke: decisions differ, e.g.", diff[:3]); sys.exit(1)
PY
