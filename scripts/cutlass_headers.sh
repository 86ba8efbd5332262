#!/usr/bin/env bash
# CUTLASS's headers for a build on a machine that cannot reach PyPI (the GPU machine): downloads the
# nvidia-cutlass wheel that requirements.txt pins and unpacks its include folder (cutlass/, cute/)
# into DEST (default out/cutlass/include in the repository, which scripts/gpu_check.sh uses when
# INT4TRAIN_CUTLASS_INCLUDE is unset; carry out/cutlass with the device call). A relative DEST is
# taken from the current directory. An existing DEST is replaced only if it holds CUTLASS headers.
# Where the wheel is installed in the build's Python, CMake finds the headers by itself.
# Usage: scripts/cutlass_headers.sh [DEST]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/out/cutlass/include}
case "$dest" in /*) ;; *) dest=$PWD/$dest ;; esac
if [ -e "$dest" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ] && [ ! -f "$dest/cutlass/version.h" ]; then
  echo "cutlass_headers.sh: $dest exists and holds no CUTLASS headers; not replacing it" >&2
  exit 2
fi
spec=$(grep -E '^nvidia-cutlass==' "$root/requirements.txt" || true)
if [ -z "$spec" ] || [ "$(printf '%s\n' "$spec" | wc -l)" != 1 ]; then
  echo "cutlass_headers.sh: expected one 'nvidia-cutlass==VERSION' line in requirements.txt" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$tmp/wheel" "$spec"
python3 - "$tmp/wheel" "$tmp/include" << 'PY'
import glob, os, shutil, sys, zipfile
wheels = glob.glob(os.path.join(sys.argv[1], "nvidia_cutlass-*.whl"))
if len(wheels) != 1:
    sys.exit(f"cutlass_headers.sh: expected one nvidia_cutlass wheel, pip gave {wheels}")
prefix, out, count = "cutlass_library/source/include/", sys.argv[2], 0
with zipfile.ZipFile(wheels[0]) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(out, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
if not os.path.isfile(os.path.join(out, "cutlass", "version.h")):
    sys.exit(f"cutlass_headers.sh: {os.path.basename(wheels[0])} has no {prefix}cutlass/version.h")
print(f"{os.path.basename(wheels[0])}: {count} headers")
PY
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp/include" "$dest"
echo "headers in $dest"
