"""The committed stubs are exactly what `make protos` generates from protos/ (no drift)."""

from __future__ import annotations

from pathlib import Path

from specdec import protogen


def test_generated_stubs_match_the_protos(tmp_path):
    written = protogen.generate(tmp_path)
    assert written, "protoc generated nothing"
    committed_dir = protogen.REPO_ROOT / "specdec" / "v1"
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in committed_dir.glob("*_pb2*.py*")}
    assert set(fresh) == set(committed), "stub files differ from the protos: run `make protos` and commit"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale stubs {stale}: run `make protos` and commit"


def test_every_proto_field_and_rpc_is_documented():
    undocumented = []
    for path in protogen.proto_files():
        lines = Path(path).read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "syntax", "//"))
            is_rpc = stripped.startswith("rpc ")
            if (is_field or is_rpc) and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{Path(path).name}:{i + 1}: {stripped}")
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)


def test_package_is_versioned():
    for path in protogen.proto_files():
        assert "package specdec.v1;" in Path(path).read_text(), f"{path} is not in the versioned package"
