#!/usr/bin/env python3
"""Checks a CycloneDX SBOM of the privlink binary, with tools nobody here wrote.

1. It is valid CycloneDX JSON of its spec version: cyclonedx-python-lib's strict JSON
   validator (`pip install "cyclonedx-python-lib[json-validation]"`), against the schema
   CycloneDX publishes.
2. It lists every crate the binary is built from: `cargo tree` (cargo's own resolver, for this
   target and these features) against the SBOM's components. A crate missing from the SBOM
   fails the check. A component the build does not use is only reported: cargo-cyclonedx reads
   `cargo metadata`, which also lists dependencies that only another target enables (quinn-proto
   takes *ring* on wasm32 alone), so such an extra is named, not hidden.

Usage: check.py SBOM.json [--features F] (run from the repository root).
"""

import argparse
import json
import subprocess
import sys

from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator


def built_from(features: str, target: str) -> set[tuple[str, str]]:
    """(name, version) of every crate `cargo tree` says the privlink binary builds from."""
    command = ["cargo", "tree", "--locked", "-p", "privlink", "-e", "normal", "--target", target,
               "--prefix", "none", "--format", "{p}"]
    if features:
        command += ["--features", features]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    crates = set()
    for line in out.splitlines():
        name, version = line.split()[:2]
        crates.add((name, version.removeprefix("v")))
    return crates


def host_target() -> str:
    out = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("host: "))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("sbom")
    parser.add_argument("--features", default="")
    args = parser.parse_args()

    text = open(args.sbom, encoding="utf-8").read()
    bom = json.loads(text)
    version = SchemaVersion.from_version(bom["specVersion"])
    error = JsonStrictValidator(version).validate_str(text)
    if error is not None:
        print(f"{args.sbom}: not valid CycloneDX {bom['specVersion']}: {error}")
        return 1

    main_component = bom["metadata"]["component"]
    listed = {(c["name"], c["version"]) for c in bom.get("components", [])}
    listed.add((main_component["name"], main_component["version"]))
    built = built_from(args.features, host_target())
    missing = sorted(built - listed)
    extra = sorted(listed - built)
    if missing:
        print(f"{args.sbom}: {len(missing)} crate(s) of the build missing from the SBOM:")
        for name, version in missing:
            print(f"  {name} {version}")
        return 1
    print(f"{args.sbom}: valid CycloneDX {bom['specVersion']}; its {len(listed)} components "
          f"cover the {len(built)} crates cargo builds the binary from")
    for name, version in extra:
        print(f"  in the SBOM, not built into the binary: {name} {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
