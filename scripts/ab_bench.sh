#!/usr/bin/env bash
# A/B of the kernel benchmark between two source trees on one GPU machine: builds
# int4train_gpu_bench (tests/gpu, Release, sm_90a) in each tree, runs `--quick` ROUNDS times, the
# two builds taking turns, and prints each row's median time in A and B and their ratio B/A. Rows
# that draw nothing random and move no differently in both builds (e.g. the W pass, the copy) are
# the run's control.
#
# Usage: scripts/ab_bench.sh OLD_TREE [NEW_TREE] [ROUNDS]
#   OLD_TREE  a source tree (A), e.g. made on the CPU machine with
#             `git archive --prefix=ab-old/ COMMIT | tar -x -C out` and carried to the GPU machine
#   NEW_TREE  the tree to compare (B); default: this repository
#   ROUNDS    runs of each build, alternating (A B, then B A, ...); default 3
# AB_FULL=1 runs the whole benchmark (all five layer shapes, about 5 s a run on an H200) instead
# of --quick (the quantizers and the first shape). Logs go to $OUT (default /tmp/int4train_ab).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ $# -gt 3 ]; then
  echo "usage: $0 OLD_TREE [NEW_TREE] [ROUNDS]" >&2
  exit 2
fi
old=$(cd "$1" && pwd)
new=$(cd "${2:-.}" && pwd)
rounds=${3:-3}
case "$rounds" in
  '' | *[!0-9]* | 0) echo "ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2 ;;
esac
for t in "$old" "$new"; do
  if [ ! -f "$t/tests/gpu/CMakeLists.txt" ]; then
    echo "$t: no tests/gpu/CMakeLists.txt (not an int4train source tree)" >&2
    exit 2
  fi
done
OUT=${OUT:-/tmp/int4train_ab}
quick=1
[ "${AB_FULL:-0}" = 1 ] && quick=
mkdir -p "$OUT"
ARCH=${INT4TRAIN_CUDA_ARCH:-90a}
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)

build() {  # tree, build dir, tag
  cmake -S "$1/tests/gpu" -B "$2" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$OUT/configure-$3.log" 2>&1 &&
    cmake --build "$2" -j8 --target int4train_gpu_bench > "$OUT/build-$3.log" 2>&1
}
build "$old" "$OUT/build-a" a & pa=$!
build "$new" "$OUT/build-b" b & pb=$!
wait $pa || { echo "build A failed:"; tail -30 "$OUT/build-a.log"; exit 1; }
wait $pb || { echo "build B failed:"; tail -30 "$OUT/build-b.log"; exit 1; }

# A first in odd rounds, B first in even ones (A B B A A B ...), so that neither build always runs
# on the GPU the other has just warmed: in stop 36's run (A always first) every layer row, the
# products' own included, came out 2-13% in B's favour where B changed one small kernel.
for r in $(seq 1 "$rounds"); do
  order="a b"
  [ $((r % 2)) = 0 ] && order="b a"
  for tag in $order; do
    "$OUT/build-$tag/bench_gpu/int4train_gpu_bench" ${quick:+--quick} > "$OUT/bench-$tag-$r.log" 2>&1
  done
done
head -1 "$OUT/bench-b-1.log"
python3 - "$OUT" "$rounds" << 'EOF'
import re
import statistics
import sys

out, rounds = sys.argv[1], int(sys.argv[2])
row = re.compile(r"^\| (.+?)\s+\|\s+([0-9.]+) ms \|")


def times(tag):
    t = {}
    for r in range(1, rounds + 1):
        with open(f"{out}/bench-{tag}-{r}.log") as f:
            for line in f:
                m = row.match(line)
                if m:
                    t.setdefault(m.group(1), []).append(float(m.group(2)))
    return t


a, b = times("a"), times("b")
print(f"median of {rounds} runs per build, ms; ratio B/A (below 1: B faster)")
print(f"| {'row':58s} | A (old) | B (new) | B/A |")
print(f"|{'-' * 60}|---|---|---|")
for name, tb in b.items():
    if name not in a:
        continue
    ma, mb = statistics.median(a[name]), statistics.median(tb)
    print(f"| {name:58s} | {ma:.4f} | {mb:.4f} | {mb / ma:.3f} |")
EOF
