#!/usr/bin/env bash
# Builds the Ferry guest: OUTDIR/Image (Linux 6.1, cached) and OUTDIR/initramfs.cpio (our static programs).
# Usage: guest/build.sh OUTDIR        env: FERRY_CACHE (default /var/cache/ferry), FERRY_GUEST_JOBS
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:?usage: guest/build.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
CACHE="${FERRY_CACHE:-/var/cache/ferry}"
CROSS=riscv64-linux-gnu-
JOBS="${FERRY_GUEST_JOBS:-$(nproc)}"
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
[[ -f "$SRC_TAR" ]] || { echo "guest: $SRC_TAR missing (apt-get install linux-source-6.1)" >&2; exit 1; }

# ---- kernel (cached by hash of the config fragment, the source package version and this section) ----
SRC_VER="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || echo unknown)"
KERNEL_RECIPE_VERSION=2
HASH="$(cat "$HERE/kernel.config" <(echo "$SRC_VER $KERNEL_RECIPE_VERSION") | sha256sum | cut -c1-16)"
KCACHE="$CACHE/kernel-$HASH"
if [[ -f "$KCACHE/Image" ]]; then
  echo "guest: kernel cache hit ($KCACHE)"
else
  echo "guest: building kernel (cache miss, $KCACHE); this takes a few minutes"
  mkdir -p "$CACHE"
  WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  tar -C "$WORK" -xf "$SRC_TAR"
  KSRC="$WORK/linux-source-6.1"
  make -C "$KSRC" -s ARCH=riscv CROSS_COMPILE=$CROSS tinyconfig
  "$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KSRC" "$KSRC/.config" "$HERE/kernel.config" >/dev/null
  make -C "$KSRC" -s ARCH=riscv CROSS_COMPILE=$CROSS olddefconfig
  # Fail loudly if a required option did not survive dependency resolution.
  missing=0
  while IFS= read -r line; do
    [[ "$line" =~ ^(CONFIG_[A-Z0-9_]+)=y$ ]] || continue
    opt="${BASH_REMATCH[1]}"
    grep -q "^$opt=y" "$KSRC/.config" || { echo "guest: kernel option $opt not set after olddefconfig" >&2; missing=1; }
  done < "$HERE/kernel.config"
  ((missing == 0)) || exit 1
  make -C "$KSRC" -s ARCH=riscv CROSS_COMPILE=$CROSS -j"$JOBS" Image
  mkdir -p "$KCACHE.tmp"
  cp "$KSRC/arch/riscv/boot/Image" "$KSRC/.config" "$KCACHE.tmp/"
  cp "$KSRC/usr/gen_init_cpio" "$KCACHE.tmp/" 2>/dev/null || true
  rm -rf "$KCACHE"; mv "$KCACHE.tmp" "$KCACHE"
  rm -rf "$WORK"; trap - EXIT
fi
cp "$KCACHE/Image" "$OUT/Image"
cp "$KCACHE/.config" "$OUT/kernel.config.full"

# ---- initramfs: only our own static programs ----
PROGS=(init memdirty echo cpubench churn blkcheck membw)
STAGE="$OUT/initramfs.stage"
rm -rf "$STAGE"; mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp}
CFLAGS=(-O2 -static -Wall -Wextra -Werror -march=rv64gc -mabi=lp64d -I "$HERE/src")
for p in "${PROGS[@]}"; do
  ${CROSS}gcc "${CFLAGS[@]}" -o "$STAGE/bin/$p" "$HERE/src/$p.c" "$HERE/src/common.c"
  ${CROSS}strip "$STAGE/bin/$p"
done
mv "$STAGE/bin/init" "$STAGE/init"
# /dev/console must exist before devtmpfs is mounted: newc archive built by python (no root needed).
python3 "$HERE/mkcpio.py" "$STAGE" "$OUT/initramfs.cpio"
rm -rf "$STAGE"
echo "guest: $OUT/Image ($(stat -c %s "$OUT/Image") bytes), $OUT/initramfs.cpio ($(stat -c %s "$OUT/initramfs.cpio") bytes)"
