#!/usr/bin/env bash
# CUTLASS's headers for a build on a machine that cannot reach PyPI (the GPU machine): downloads the
# nvidia-cutlass wheel that requirements.txt names and unpacks its include folder (cutlass/, cute/)
# into DEST (default out/cutlass/include, which scripts/gpu_check.sh uses when
# INT4TRAIN_CUTLASS_INCLUDE is unset; carry out/cutlass with the device call). Where the wheel is
# installed in the build's Python, CMake finds the headers by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-out/cutlass/include}
spec=$(grep -E '^nvidia-cutlass' requirements.txt)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "$spec"
python3 - "$tmp" "$dest" << 'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "nvidia_cutlass-*.whl"))[0]
prefix = "cutlass_library/source/include/"
shutil.rmtree(dest, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
print(f"{os.path.basename(wheel)}: headers in {dest}")
PY
