#!/usr/bin/env bash
# Runs every test of the workspace. This is the README's test command and the heart of .ci/run.
# It installs what the tests need and is missing (on Debian, as root or with sudo), so a new
# machine needs nothing but Rust.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# (Packages for tests that drive real external servers are added here as those tests arrive.)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q "${need_pkgs[@]}"
fi

cargo test --workspace --locked "$@"
