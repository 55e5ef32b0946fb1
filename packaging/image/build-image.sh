#!/bin/sh
# Builds the Coffer guest image: Debian 12 with MariaDB, mariadb-backup, cloud-init and the
# coffer-agent package, as a GPT disk in a qcow2 file: a FAT boot partition (the EFI system
# partition, with systemd-boot for UEFI and syslinux for BIOS, marked legacy-BIOS-bootable behind
# syslinux's GPT MBR) and an ext4 root. No loop devices and no mounts of the image: the root is
# made with mmdebstrap in a directory and written into the filesystem with `mke2fs -d`, the boot
# partition with mtools (and syslinux, which uses mtools).
#
#   build-image.sh AGENT_DEB OUT.qcow2 [WORK_DIR]
#
# The image masks mariadb.service (the agent runs the database), has an empty /etc/machine-id and
# no agent state or keys: every clone gets its own identity at first boot, when cloud-init
# (NoCloud) hands the agent its controller URL and enrolment token.
set -eu
export PATH="$PATH:/usr/sbin:/sbin"
AGENT_DEB=$(realpath "$1")
OUT=$(realpath -m "$2")
WORK=${3:-$(mktemp -d)}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
ROOT="$WORK/root"
HERE=$(dirname "$(realpath "$0")")
MIRROR=${COFFER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Downloaded .debs are kept between builds (mmdebstrap's documented sync-in/sync-out cache).
CACHE=${COFFER_IMAGE_APT_CACHE:-$WORK/apt-archives}
mkdir -p "$CACHE"

step() { printf '==> %s\n' "$*"; }

rm -rf "$ROOT"
mkdir -p "$ROOT"
ROOT_UUID=$(cat /proc/sys/kernel/random/uuid)
step "debootstrapping Debian 12 with MariaDB, cloud-init and the agent (mmdebstrap)"
mmdebstrap --variant=minbase --mode=root --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --include=systemd,systemd-sysv,udev,dbus,linux-image-cloud-amd64,initramfs-tools,cloud-init,cloud-guest-utils,fdisk,e2fsprogs,iproute2,netbase,ca-certificates,adduser,mariadb-server,mariadb-client,mariadb-backup,zstd \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives/"' \
    --setup-hook="sync-in $CACHE /var/cache/apt/archives/" \
    --customize-hook="copy-in $AGENT_DEB /tmp" \
    --customize-hook='chroot "$1" dpkg -i /tmp/'"$(basename "$AGENT_DEB")" \
    --customize-hook='rm -f "$1"/tmp/*.deb' \
    --customize-hook="sync-in $HERE/rootfs /" \
    --customize-hook='chroot "$1" systemctl mask mariadb.service mariadb.socket' \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service coffer-agent.service' \
    --customize-hook='chroot "$1" sh -c "rm -rf /var/lib/mysql/* /var/lib/coffer/agent /var/lib/cloud/*"' \
    --customize-hook='chroot "$1" passwd -l root' \
    --customize-hook='truncate -s 0 "$1/etc/machine-id"' \
    --customize-hook="printf 'UUID=%s / ext4 errors=remount-ro 0 1\\n' $ROOT_UUID > \"\$1/etc/fstab\"" \
    --customize-hook='rm -f "$1/var/lib/dbus/machine-id" "$1"/etc/ssh/ssh_host_* "$1"/var/log/*.log' \
    --customize-hook="sync-out /var/cache/apt/archives $CACHE" \
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*' \
    bookworm "$ROOT" "$MIRROR"

step "checking the image's promises"
fail() { echo "image check failed: $*" >&2; exit 1; }
[ ! -s "$ROOT/etc/machine-id" ] || fail "/etc/machine-id is not empty"
for u in mariadb.service mariadb.socket; do
    [ "$(readlink "$ROOT/etc/systemd/system/$u")" = /dev/null ] || fail "$u is not masked"
done
[ ! -e "$ROOT/var/lib/coffer/agent/agent.key" ] || fail "an agent key is in the image"
[ -z "$(ls -A "$ROOT/var/lib/coffer/agent" 2>/dev/null)" ] || fail "agent state is in the image"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/coffer-agent.service" ] || fail "coffer-agent is not enabled"
[ -x "$ROOT/usr/bin/coffer-agent" ] || fail "coffer-agent is not installed"

KVER=$(ls "$ROOT/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
[ -n "$KVER" ] || { echo "no kernel in the root" >&2; exit 1; }

step "writing the root filesystem (ext4, mke2fs -d)"
ROOT_MB=$(( $(du -sm "$ROOT" | cut -f1) * 13 / 10 + 512 ))
ESP_MB=128
rm -f "$WORK/root.ext4" "$WORK/esp.vfat" "$WORK/disk.raw"
mke2fs -q -t ext4 -L coffer-root -U "$ROOT_UUID" -d "$ROOT" "$WORK/root.ext4" "${ROOT_MB}M"

step "writing the boot partition (systemd-boot for UEFI, syslinux for BIOS)"
CMDLINE="root=UUID=$ROOT_UUID rw console=ttyS0,115200 net.ifnames=0"
mkfs.vfat -n COFFER-ESP -C "$WORK/esp.vfat" $((ESP_MB * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$WORK/esp.vfat" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/coffer ::/syslinux
syslinux --install --directory /syslinux "$WORK/esp.vfat"
printf 'DEFAULT coffer\nPROMPT 0\nTIMEOUT 0\nLABEL coffer\n  LINUX /coffer/vmlinuz\n  INITRD /coffer/initrd.img\n  APPEND %s\n' \
    "$CMDLINE" > "$WORK/syslinux.cfg"
mcopy -i "$WORK/esp.vfat" "$WORK/syslinux.cfg" ::/syslinux/syslinux.cfg
mcopy -i "$WORK/esp.vfat" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$WORK/esp.vfat" "$ROOT/boot/vmlinuz-$KVER" ::/coffer/vmlinuz
mcopy -i "$WORK/esp.vfat" "$ROOT/boot/initrd.img-$KVER" ::/coffer/initrd.img
printf 'default coffer.conf\ntimeout 0\n' > "$WORK/loader.conf"
printf 'title Coffer guest (Debian 12, %s)\nlinux /coffer/vmlinuz\ninitrd /coffer/initrd.img\noptions %s\n' \
    "$KVER" "$CMDLINE" > "$WORK/coffer.conf"
mcopy -i "$WORK/esp.vfat" "$WORK/loader.conf" ::/loader/loader.conf
mcopy -i "$WORK/esp.vfat" "$WORK/coffer.conf" ::/loader/entries/coffer.conf

step "assembling the GPT disk and converting it to qcow2"
TOTAL_MB=$((1 + ESP_MB + ROOT_MB + 1))
truncate -s "${TOTAL_MB}M" "$WORK/disk.raw"
sfdisk -q "$WORK/disk.raw" <<PARTS
label: gpt
start=1MiB, size=${ESP_MB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp, attrs="LegacyBIOSBootable"
start=$((1 + ESP_MB))MiB, size=${ROOT_MB}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root
PARTS
dd if=/usr/lib/syslinux/mbr/gptmbr.bin of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/esp.vfat" of="$WORK/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$WORK/root.ext4" of="$WORK/disk.raw" bs=1M seek=$((1 + ESP_MB)) conv=notrunc,sparse status=none
mkdir -p "$(dirname "$OUT")"
qemu-img convert -q -c -f raw -O qcow2 "$WORK/disk.raw" "$OUT"
rm -f "$WORK/root.ext4" "$WORK/esp.vfat" "$WORK/disk.raw" "$WORK"/*.cfg "$WORK"/*.conf
step "done: $OUT ($(du -m "$OUT" | cut -f1) MiB on disk, ${TOTAL_MB} MiB virtual, kernel $KVER)"
