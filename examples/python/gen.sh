#!/usr/bin/env bash
# Generates the Python stubs of the twin.v1 API from proto/ into examples/python/generated/
# (or the directory given as $1), then imports every generated module to prove they load.
# Needs the packages of requirements.txt. Exits non-zero if generation or the import fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "$here/../../proto" && pwd)"
out="${1:-$here/generated}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import grpc_tools.protoc' 2>/dev/null; then
    echo "error: grpcio-tools is not installed for $python (pip install -r $here/requirements.txt)" >&2
    exit 1
fi

shopt -s nullglob
protos=("$proto_root"/twin/v1/*.proto)
if [ "${#protos[@]}" -eq 0 ]; then
    echo "error: no .proto files in $proto_root/twin/v1" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out"
# `python -m grpc_tools.protoc` adds the well-known types (google/protobuf/*.proto) that
# grpcio-tools ships to the include path; no system protoc is used.
"$python" -m grpc_tools.protoc \
    --proto_path="$proto_root" \
    --python_out="$out" \
    --pyi_out="$out" \
    --grpc_python_out="$out" \
    "${protos[@]}"

modules=()
for proto in "${protos[@]}"; do
    stem="$(basename "$proto" .proto)"
    modules+=("twin.v1.${stem}_pb2" "twin.v1.${stem}_pb2_grpc")
done
PYTHONPATH="$out" "$python" - "${modules[@]}" <<'PY'
import importlib
import sys

stubs = {"TwinsStub", "DeviceSyncStub", "TelemetryStub", "ModelsStub", "SimulationStub"}
found = set()
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    found.update(stub for stub in stubs if hasattr(module, stub))
missing = stubs - found
if missing:
    sys.exit(f"error: generated stubs lack {sorted(missing)}")
PY
echo "generated ${#modules[@]} modules from ${#protos[@]} files into $out"
