#!/bin/sh
# Runs once, as root, inside the outer test VM of the firecracker tier: nested KVM, the Firecracker binaries,
# an `ai` command made of the project in the workspace share, and the inner image's cache entries.
set -eu
ws=/workspace

# Nested KVM: QEMU's TCG `-cpu max` offers AMD SVM; a KVM host would pass its own vendor's extension.
if grep -qw svm /proc/cpuinfo; then modprobe kvm_amd; else modprobe kvm_intel; fi
modprobe tun
test -c /dev/kvm

# On PATH, where `ai` finds it (as after a manual install); the jailer too when the tier was given one.
install -m 0755 "$ws/bin/firecracker" /usr/local/bin/firecracker
if [ -f "$ws/bin/jailer" ]; then install -m 0755 "$ws/bin/jailer" /usr/local/bin/jailer; fi

# The project and its dependencies on the local disk: imports from the share are markedly slower under TCG.
rm -rf /opt/ai-sandbox
mkdir -p /opt/ai-sandbox
cp -a "$ws/src" "$ws/py" /opt/ai-sandbox/

# The cache entries go to the local disk (root cannot write the share: it is mapped to the host user);
# their big files stay symlinks into the share.
rm -rf /var/cache/ai-sandbox
cp -a "$ws/cache" /var/cache/ai-sandbox

# `ai` checks for the image build tools before every build, even when every stage is cached. This VM never
# builds: stand-ins that fail loudly, on the PATH of `ai` only.
shims=/usr/local/lib/ai-fc-shims
mkdir -p "$shims"
for tool in mmdebstrap lz4 npm; do
    if ! command -v "$tool" >/dev/null; then
        printf '#!/bin/sh\necho "%s: not in the firecracker test VM (it never builds images)" >&2\nexit 1\n' \
            "$tool" > "$shims/$tool"
        chmod 0755 "$shims/$tool"
    fi
done

cat > /usr/local/bin/ai <<EOF
#!/bin/sh
# ai as brought in by the firecracker test tier.
export PYTHONPATH=/opt/ai-sandbox/src:/opt/ai-sandbox/py PYTHONDONTWRITEBYTECODE=1
export AI_SANDBOX_CACHE=/var/cache/ai-sandbox
# This VM's own address comes from the default pool of the ai that started it.
export AI_SANDBOX_NET_POOL=10.214.0.0/16
# Nested under TCG a boot takes minutes, more when the host is busy.
export AI_SANDBOX_BOOT_TIMEOUT=900
export PATH="\$PATH:$shims"
exec python3 -m ai_sandbox "\$@"
EOF
chmod 0755 /usr/local/bin/ai
echo "guest-setup: ok ($(firecracker --version | head -n 1), $(uname -r))"
