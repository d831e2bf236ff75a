#!/usr/bin/env python3
"""Fails when a data-plane module uses a layer above its own (docs/architecture.md).

The layers of `dataplane/src`, from the top: a module may name (`crate::layer::...`) its own
layer and the ones below it, never one above. Comments are skipped (a doc link is not a
dependency). Exit status 1 lists each upward use as `file:line: layer -> layer`.

Usage: scripts/check-layers.py [dataplane/src]
       scripts/check-layers.py --self-test   (shows it failing on a deliberate upward use)
"""
import pathlib
import re
import sys

# Top to bottom. Keep in step with docs/architecture.md and dataplane/src/lib.rs.
LAYERS = ["app", "http", "admin", "gateway", "config", "routing", "limits", "accounting",
          "upstream", "api", "telemetry", "rt"]
RANK = {name: i for i, name in enumerate(LAYERS)}
USE = re.compile(r"\bcrate::([a-z_0-9]+)")
# `use crate::{a::X, b}`: the names at the top level of the braces.
GROUP = re.compile(r"\bcrate::\{([^}]*)")
COMMENT = re.compile(r"//.*")


def layer_of(src: pathlib.Path, path: pathlib.Path):
    top = path.relative_to(src).parts[0]
    if top.endswith(".rs"):
        top = top[:-3]
    return top


def check(src: pathlib.Path) -> list:
    problems = []
    unknown = set()
    for path in sorted(src.rglob("*.rs")):
        own = layer_of(src, path)
        if own in ("lib", "main", "bin"):
            continue  # the crate root and the binaries sit above every layer
        if own not in RANK:
            unknown.add(own)
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = COMMENT.sub("", line)
            used_here = [m.group(1) for m in USE.finditer(code)]
            for g in GROUP.finditer(code):
                used_here += re.findall(r"(?:^|,)\s*([a-z_0-9]+)", g.group(1))
            for used in used_here:
                if used not in RANK:
                    unknown.add(used)
                elif RANK[used] < RANK[own]:
                    problems.append(f"{path}:{n}: {own} -> {used} (upward)")
    for name in sorted(unknown):
        problems.append(f"{src}/{name}: not a layer; add it to LAYERS in {sys.argv[0]}")
    return problems


def self_test() -> int:
    """A tree with one upward use (routing -> gateway), one downward and one in a comment."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d)
        (src / "routing").mkdir()
        (src / "rt").mkdir()
        (src / "lib.rs").write_text("pub mod routing;\npub mod rt;\n")
        (src / "routing" / "mod.rs").write_text(
            "//! See [`crate::app`].\nuse crate::rt::clock;\nuse crate::gateway::state::AppState;\n"
            "use crate::{rt::deadline, app::Args};\n")
        (src / "rt" / "mod.rs").write_text("pub fn f() {}\n")
        problems = check(src)
    expected = [f"{src}/routing/mod.rs:3: routing -> gateway (upward)",
                f"{src}/routing/mod.rs:4: routing -> app (upward)"]
    if problems != expected:
        print(f"self-test failed: {problems} != {expected}")
        return 1
    print("self-test: the deliberate upward uses are reported:", *problems, sep="\n  ")
    return 0


def main() -> int:
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "dataplane/src")
    problems = check(src)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} upward or unknown uses; layers, top to bottom: {' > '.join(LAYERS)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
