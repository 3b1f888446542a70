#!/usr/bin/env bash
# The privlink binary's CycloneDX SBOM (README, "Supply chain"), for the ordinary and the FIPS
# build: target/sbom/privlink.cdx.json and target/sbom/privlink-fips.cdx.json, each checked by
# deploy/sbom/check.py. Needs cargo-cyclonedx (`cargo install --locked cargo-cyclonedx`) and
# `pip install "cyclonedx-python-lib[json-validation]"`. Run from anywhere in the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p target/sbom
target=$(rustc -vV | sed -n 's/^host: //p')
for variant in default fips; do
  features=()
  name=privlink
  if [[ $variant == fips ]]; then
    features=(--features fips)
    name=privlink-fips
  fi
  # Runtime dependencies of the `privlink` binary for this machine's target; cargo-cyclonedx
  # writes privlink_bin.cdx.json beside Cargo.toml, moved into target/.
  cargo cyclonedx --quiet --format json --spec-version 1.5 --describe binaries --no-build-deps \
    --target "$target" "${features[@]}"
  mv privlink_bin.cdx.json "target/sbom/$name.cdx.json"
  python3 deploy/sbom/check.py "target/sbom/$name.cdx.json" "${features[@]}"
done
